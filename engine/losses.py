"""The training losses: masked next-token cross-entropy (CPT, SFT) and the DPO family (sigmoid, IPO, hinge).

The DPO family follows TRL's DPOTrainer: a sequence's log-probability is the sum over its response tokens, except
for IPO, which uses the mean per response token (TRL divides by the number of response tokens), for the policy and
the reference alike; the implicit rewards and the logps/* metrics are computed from the same values.

Labels are already shifted by the data pipeline: labels[:, t] is the target of the prediction made at position t,
and -100 marks positions without loss. No [B, T, vocab] logits are kept: the LM head and the cross-entropy run
together in `ops.fused_linear_cross_entropy`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hippocrates.kernels import ops
from hippocrates.models.lora import adapters_disabled, lora_layers

IGNORE_INDEX = -100
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
LENGTH_AVERAGED = ("ipo",)  # loss types that use the mean log-prob per response token, as TRL does


def count_target_tokens(labels: torch.Tensor) -> int:
    """Positions that carry loss; sum this over the whole global batch (all ranks, all micro-batches)."""
    return int((labels != IGNORE_INDEX).sum())


def token_cross_entropy(model, batch: dict[str, torch.Tensor], num_target_tokens: int | torch.Tensor):
    """Summed next-token cross-entropy of one micro-batch divided by the GLOBAL count of target tokens.

    Dividing by the global count (not the micro-batch's own) makes the sum of the micro-batch losses over ranks and
    accumulation steps equal the mean loss of the global batch, however it is split. A global batch without any
    target token gives 0 (not NaN).
    """
    hidden = model(batch["input_ids"], segment_ids=batch.get("segment_ids"), return_hidden=True)  # [B, T, H]
    loss_sum = ops.fused_linear_cross_entropy(hidden.flatten(0, 1), model.output_weight,
                                                  batch["labels"].flatten(), ignore_index=IGNORE_INDEX,
                                                  reduction="sum")
    if isinstance(num_target_tokens, torch.Tensor):
        return loss_sum / num_target_tokens.clamp(min=1)
    return loss_sum / max(int(num_target_tokens), 1)


def sequence_logps(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """input_ids, labels [B, T] -> [B]: the summed log-probability of each row's label tokens (-100 skipped)."""
    hidden = model(input_ids, return_hidden=True)  # [B, T, H]
    token_nll = ops.fused_linear_cross_entropy(hidden.flatten(0, 1), model.output_weight, labels.flatten(),
                                                   ignore_index=IGNORE_INDEX, reduction="none")  # [B * T]
    return -token_nll.view(labels.shape).sum(dim=-1)


def _chosen_rejected_logps(model, batch):
    """Chosen and rejected rows in one forward: [2B, T] -> (chosen [B], rejected [B])."""
    chosen_ids, rejected_ids = batch["chosen_input_ids"], batch["rejected_input_ids"]
    if chosen_ids.shape != rejected_ids.shape:
        raise ValueError(f"chosen_input_ids {tuple(chosen_ids.shape)} and rejected_input_ids "
                         f"{tuple(rejected_ids.shape)} must have the same shape (pad both to seq_len)")
    input_ids = torch.cat([chosen_ids, rejected_ids])  # [2B, T]
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])  # [2B, T]
    logps = sequence_logps(model, input_ids, labels)  # [2B]
    return logps.chunk(2)


def dpo_logps(model, batch: dict[str, torch.Tensor], reference_model=None, loss_type: str = "sigmoid"):
    """(policy_chosen, policy_rejected, ref_chosen, ref_rejected) log-probs, each [B]: summed over the response
    tokens, or averaged over them for the loss types in LENGTH_AVERAGED.

    The reference policy is, in order: `batch["ref_chosen_logps"]` / `batch["ref_rejected_logps"]` (sums) when they
    were precomputed in one pass over the data; a frozen `reference_model` (full fine-tuning); otherwise the policy
    model itself with its LoRA adapters disabled.
    """
    policy_chosen, policy_rejected = _chosen_rejected_logps(model, batch)
    if "ref_chosen_logps" in batch and "ref_rejected_logps" in batch:
        ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    else:
        ref_chosen, ref_rejected = reference_logps(model, batch, reference_model)
    logps = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    if loss_type in LENGTH_AVERAGED:
        chosen_tokens, rejected_tokens = response_tokens(batch)  # [B] each
        logps = tuple(lp / n for lp, n in zip(logps, (chosen_tokens, rejected_tokens) * 2))
    return logps


def response_tokens(batch: dict[str, torch.Tensor]):
    """(chosen [B], rejected [B]): the number of label tokens of each response, at least 1."""
    return tuple((batch[f"{side}_labels"] != IGNORE_INDEX).sum(dim=-1).clamp(min=1)
                 for side in ("chosen", "rejected"))


@torch.no_grad()
def reference_logps(model, batch: dict[str, torch.Tensor], reference_model=None):
    """(ref_chosen, ref_rejected) [B] from `reference_model`, or from `model` with its adapters disabled."""
    if reference_model is not None:
        return _chosen_rejected_logps(reference_model, batch)
    if not lora_layers(model):
        raise ValueError("DPO needs a reference policy: the model has no LoRA adapters to disable, "
                         "so pass a frozen reference_model (full fine-tuning) or precomputed reference log-probs")
    with adapters_disabled(model):
        return _chosen_rejected_logps(model, batch)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """Per-pair DPO losses [B] and the batch-mean metrics TRL reports, from the log-probs `dpo_logps` gives.

    With z = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l)):
      sigmoid (DPO, Rafailov et al. 2023; conservative DPO with label smoothing eps):
              -(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z)
      ipo     (Azar et al. 2023, eq. 17, beta plays tau):  (z - 1 / (2 beta))^2
      hinge   (SLiC, Zhao et al. 2023):  max(0, 1 - beta z)
    Implicit rewards: beta (log pi - log ref) of each response.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo loss_type={loss_type!r}: expected one of {DPO_LOSS_TYPES}")
    if beta <= 0:
        raise ValueError(f"dpo beta={beta}: must be > 0")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo label_smoothing={label_smoothing}: must be in [0, 0.5)")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"dpo label_smoothing applies to loss_type='sigmoid' only, not {loss_type!r}")

    z = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)  # [B]
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * z) - label_smoothing * F.logsigmoid(-beta * z)
    elif loss_type == "ipo":
        losses = (z - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * z)

    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()  # [B]
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()  # [B]
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
    }
    return losses, metrics
