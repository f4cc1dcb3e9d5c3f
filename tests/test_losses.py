"""engine.losses against direct float64 computations on full logits (tiny random models, fresh inputs)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from hippocrates.engine.losses import (LENGTH_AVERAGED, count_target_tokens, dpo_logps, dpo_loss, reference_logps,
                                      response_tokens, sequence_logps, token_cross_entropy)
from hippocrates.models import ModelConfig, build_model
from hippocrates.models.lora import LoraConfig, add_lora, adapters_disabled

VOCAB, SEQ = 96, 24


def tiny_model(seed, tied=True, lora_rank=4):
    config = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=64, tie_word_embeddings=tied)
    model = build_model(config).init_weights(std=0.2, seed=seed)
    if lora_rank:
        add_lora(model, LoraConfig(rank=lora_rank, alpha=8.0), seed=seed)
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():  # B = 0 at init would make the adapters a no-op; give them a real effect
            for name, p in model.named_parameters():
                if "lora_b" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def base_copy(model, seed):
    """The same base weights in a model without adapters."""
    base = tiny_model(seed, tied=model.config.tie_word_embeddings, lora_rank=0)
    state = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    base.load_state_dict(state)
    return base


def random_lm_batch(gen, rows):
    input_ids = torch.randint(0, VOCAB, (rows, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (rows, SEQ), generator=gen)
    labels[torch.rand(rows, SEQ, generator=gen) < 0.3] = -100
    segment_ids = (torch.rand(rows, SEQ, generator=gen) < 0.15).long().cumsum(dim=1)
    return {"input_ids": input_ids, "labels": labels, "segment_ids": segment_ids}


def random_dpo_batch(gen, pairs):
    batch = {}
    prompt_len = torch.randint(3, 8, (pairs,), generator=gen)
    for side in ("chosen", "rejected"):
        ids = torch.randint(0, VOCAB, (pairs, SEQ), generator=gen)
        labels = torch.full((pairs, SEQ), -100)
        for i in range(pairs):
            end = int(torch.randint(int(prompt_len[i]) + 2, SEQ, (1,), generator=gen))
            start = int(prompt_len[i])
            labels[i, start - 1:end - 1] = ids[i, start:end]  # shifted response targets
            ids[i, end:] = 0  # right padding
        batch[f"{side}_input_ids"], batch[f"{side}_labels"] = ids, labels
    return batch


def token_logps_float64(model, input_ids, labels):
    """Independent: full logits, log_softmax + gather in float64 -> per-token log-probs [B, T] (0 off the mask)."""
    logits = model(input_ids).double()  # [B, T, V]
    logprobs = logits.log_softmax(dim=-1)
    mask = labels != -100
    return logprobs.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * mask  # [B, T]


def logps_float64(model, input_ids, labels):
    return token_logps_float64(model, input_ids, labels).sum(dim=-1)


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("tied", [True, False])
def test_token_cross_entropy_equals_full_logits_cross_entropy(tied):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    model = tiny_model(seed=3, tied=tied)
    batch = random_lm_batch(gen, rows=3)
    n = count_target_tokens(batch["labels"])
    assert n == int((batch["labels"] != -100).sum()) and n > 0

    loss = token_cross_entropy(model, batch, n)
    loss.backward()
    ours = lora_grads(model)
    model.zero_grad()

    logits = model(batch["input_ids"], segment_ids=batch["segment_ids"])  # [B, T, V]
    expected = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_global_count_makes_split_batches_sum_to_full_batch():
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    model = tiny_model(seed=5)
    batch = random_lm_batch(gen, rows=4)
    n = count_target_tokens(batch["labels"])

    full = token_cross_entropy(model, batch, n)
    full.backward()
    full_grads = lora_grads(model)
    model.zero_grad()

    parts = [{k: v[rows] for k, v in batch.items()} for rows in (slice(0, 1), slice(1, 4))]
    split = sum(token_cross_entropy(model, part, n) for part in parts)
    split.backward()
    torch.testing.assert_close(split, full, rtol=1e-5, atol=1e-6)
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # the micro-batch's own count would weight the parts wrongly
    own = sum(token_cross_entropy(model, p, count_target_tokens(p["labels"])) for p in parts) / len(parts)
    assert not torch.allclose(own, full, rtol=1e-4)


def test_batch_without_targets_gives_zero_loss():
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    batch = random_lm_batch(gen, rows=2)
    batch["labels"].fill_(-100)
    loss = token_cross_entropy(tiny_model(seed=2), batch, count_target_tokens(batch["labels"]))
    assert float(loss.detach()) == 0.0


def test_sequence_logps_equals_float64_log_softmax_gather():
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    model = tiny_model(seed=7)
    batch = random_dpo_batch(gen, pairs=3)
    ours = sequence_logps(model, batch["chosen_input_ids"], batch["chosen_labels"])
    expected = logps_float64(model, batch["chosen_input_ids"], batch["chosen_labels"])
    assert ours.shape == (3,)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-4)


def test_adapters_disabled_gives_base_model_logits():
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    model = tiny_model(seed=11)
    base = base_copy(model, seed=11)
    input_ids = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    with torch.no_grad():
        with adapters_disabled(model):
            disabled = model(input_ids)
        enabled = model(input_ids)
        expected = base(input_ids)
    torch.testing.assert_close(disabled, expected, rtol=0, atol=1e-6)
    assert (enabled - expected).abs().max() > 1e-2  # the adapters do change the function
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids), enabled, rtol=0, atol=0)  # re-enabled on exit


def trl_dpo_float64(per_token: dict, masks: dict, beta, loss_type, eps):
    """TRL's DPOTrainer, written from its documented definitions, in Python floats.

    per_token[k] [B, T] log-probs of the label tokens for k in policy_chosen, policy_rejected, ref_chosen,
    ref_rejected; masks[side] [B, T] the response-token mask of chosen / rejected. A sequence's log-prob is the sum
    of its response tokens, divided by their number for IPO. logits = (pi_c - pi_r) - (ref_c - ref_r);
    sigmoid: -(1-eps) log sig(beta logits) - eps log sig(-beta logits); ipo: (logits - 1/(2 beta))^2;
    hinge: relu(1 - beta logits). rewards/chosen = beta (pi_c - ref_c), rewards/rejected likewise, margins their
    difference, accuracies the share with chosen > rejected; logps/* the policy's sequence log-probs.
    """
    seq = {}
    for key, values in per_token.items():
        mask = masks[key.split("_")[1]]
        rows = []
        for row, row_mask in zip(values.tolist(), mask.tolist()):
            total = sum(v for v, m in zip(row, row_mask) if m)
            rows.append(total / sum(row_mask) if loss_type == "ipo" else total)
        seq[key] = rows
    losses, chosen_r, rejected_r = [], [], []
    for pc, pr, rc, rr in zip(seq["policy_chosen"], seq["policy_rejected"], seq["ref_chosen"], seq["ref_rejected"]):
        z = (pc - pr) - (rc - rr)
        if loss_type == "sigmoid":
            log_sig = lambda x: -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))
            losses.append(-(1 - eps) * log_sig(beta * z) - eps * log_sig(-beta * z))
        elif loss_type == "ipo":
            losses.append((z - 1 / (2 * beta)) ** 2)
        else:
            losses.append(max(0.0, 1 - beta * z))
        chosen_r.append(beta * (pc - rc))
        rejected_r.append(beta * (pr - rr))
    n = len(losses)
    metrics = {
        "rewards/chosen": sum(chosen_r) / n,
        "rewards/rejected": sum(rejected_r) / n,
        "rewards/accuracies": sum(x > y for x, y in zip(chosen_r, rejected_r)) / n,
        "rewards/margins": sum(x - y for x, y in zip(chosen_r, rejected_r)) / n,
        "logps/chosen": sum(seq["policy_chosen"]) / n,
        "logps/rejected": sum(seq["policy_rejected"]) / n,
    }
    return torch.tensor(losses, dtype=torch.float64), metrics


@pytest.fixture(scope="module")
def dpo_case():
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    model = tiny_model(seed=13)
    batch = random_dpo_batch(gen, pairs=4)
    base = base_copy(model, seed=13)
    with torch.no_grad():
        per_token = {f"{who}_{side}": token_logps_float64(m, batch[f"{side}_input_ids"], batch[f"{side}_labels"])
                     for who, m in (("policy", model), ("ref", base)) for side in ("chosen", "rejected")}
    masks = {side: batch[f"{side}_labels"] != -100 for side in ("chosen", "rejected")}
    return model, base, batch, per_token, masks


def test_dpo_logps_policy_and_reference(dpo_case):
    model, base, batch, per_token, _ = dpo_case
    independent = [per_token[k].sum(dim=-1) for k in ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")]
    lora_side = dpo_logps(model, batch)
    frozen_copy_side = dpo_logps(model, batch, reference_model=base)
    for ours in (lora_side, frozen_copy_side):
        for got, expected in zip(ours, independent):
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
    assert lora_side[0].requires_grad and not lora_side[2].requires_grad
    precomputed = dict(batch, ref_chosen_logps=independent[2], ref_rejected_logps=independent[3])
    assert dpo_logps(model, precomputed)[2] is independent[2]
    with pytest.raises(ValueError, match="reference"):
        reference_logps(base, batch)


@pytest.mark.parametrize("loss_type,beta,eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("ipo", 0.1, 0.0),
                                                ("ipo", 0.5, 0.0), ("hinge", 0.3, 0.0)])
def test_dpo_loss_and_rewards_equal_trl_formulas(dpo_case, loss_type, beta, eps):
    """The model's log-probs through dpo_logps + dpo_loss against TRL's definitions (IPO length-averaged), for the
    LoRA-disabled reference and for precomputed (summed) reference log-probs alike."""
    model, _, batch, per_token, masks = dpo_case
    expected_losses, expected_metrics = trl_dpo_float64(per_token, masks, beta, loss_type, eps)
    precomputed = dict(batch, ref_chosen_logps=per_token["ref_chosen"].sum(-1).float(),
                       ref_rejected_logps=per_token["ref_rejected"].sum(-1).float())
    for inputs in (batch, precomputed):
        losses, metrics = dpo_loss(*dpo_logps(model, inputs, loss_type=loss_type), beta=beta, loss_type=loss_type,
                                   label_smoothing=eps)
        assert losses.shape == (4,)
        torch.testing.assert_close(losses.double(), expected_losses, rtol=1e-4, atol=1e-5)
        assert set(metrics) == set(expected_metrics)
        for name, value in expected_metrics.items():
            assert float(metrics[name]) == pytest.approx(value, rel=1e-4, abs=1e-5), name


@pytest.mark.parametrize("loss_type,beta,eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.3, 0.1), ("ipo", 0.2, 0.0),
                                                ("hinge", 0.5, 0.0)])
def test_dpo_loss_on_fixed_log_probs_equals_trl_formulas(loss_type, beta, eps):
    """Fixed per-token log-probs and response masks (no model): sequence log-probs as TRL forms them, then the
    loss and rewards. Masks differ in length between chosen and rejected, so IPO's averaging matters."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    pairs, width = 6, 12
    masks = {side: torch.arange(width) < torch.randint(1, width + 1, (pairs, 1), generator=gen)
             for side in ("chosen", "rejected")}
    per_token = {f"{who}_{side}": -torch.rand(pairs, width, generator=gen, dtype=torch.float64) * 3 * masks[side]
                 for who in ("policy", "ref") for side in ("chosen", "rejected")}
    expected_losses, expected_metrics = trl_dpo_float64(per_token, masks, beta, loss_type, eps)

    sums = [per_token[k].sum(-1) for k in ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")]
    if loss_type in LENGTH_AVERAGED:
        batch = {f"{side}_labels": torch.where(masks[side], 1, -100) for side in ("chosen", "rejected")}
        counts = response_tokens(batch)
        sums = [s / counts[i % 2] for i, s in enumerate(sums)]
    losses, metrics = dpo_loss(*sums, beta=beta, loss_type=loss_type, label_smoothing=eps)
    torch.testing.assert_close(losses, expected_losses, rtol=1e-10, atol=1e-12)
    for name, value in expected_metrics.items():
        assert float(metrics[name]) == pytest.approx(value, rel=1e-6, abs=1e-12), name  # accuracies: fp32 mean


def test_ipo_on_sums_would_differ_from_trl(dpo_case):
    """IPO's averaging is not a no-op here: the summed log-probs give another loss."""
    model, _, batch, per_token, masks = dpo_case
    expected_losses, _ = trl_dpo_float64(per_token, masks, 0.1, "ipo", 0.0)
    summed, _ = dpo_loss(*dpo_logps(model, batch, loss_type="sigmoid"), beta=0.1, loss_type="ipo")
    assert not torch.allclose(summed.double(), expected_losses, rtol=1e-2)


def test_dpo_loss_gradient_matches_float64_autograd(dpo_case):
    model, base, batch, _, _ = dpo_case
    model.zero_grad()
    losses, _ = dpo_loss(*dpo_logps(model, batch), beta=0.5, label_smoothing=0.1)
    losses.mean().backward()
    ours = lora_grads(model)
    model.zero_grad()

    model64, base64 = tiny_model(seed=13).double(), copy.deepcopy(base).double()
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    pc, pr = (logps_float64(model64, batch[f"{s}_input_ids"], batch[f"{s}_labels"]) for s in ("chosen", "rejected"))
    with torch.no_grad():
        rc, rr = (logps_float64(base64, batch[f"{s}_input_ids"], batch[f"{s}_labels"]) for s in ("chosen", "rejected"))
    z = (pc - pr) - (rc - rr)
    expected = (-0.9 * F.logsigmoid(0.5 * z) - 0.1 * F.logsigmoid(-0.5 * z)).mean()
    expected.backward()
    for name, p in model64.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[name].double(), p.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_dpo_policy_runs_without_lora_dropout_by_default():
    """dpo.policy_dropout=false (the default) turns LoRA dropout off, so in train mode the policy's log-probs are
    the deterministic ones the (dropout-free) reference is compared with."""
    from hippocrates.engine.config import DPOConfig
    from hippocrates.engine.trainer import disable_lora_dropout
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    model = tiny_model(seed=17)
    for module in model.modules():
        if getattr(module, "lora_a", None) is not None:
            module.lora_dropout = 0.3
    batch = random_dpo_batch(gen, pairs=2)
    model.train()
    with torch.no_grad():
        noisy = [dpo_logps(model, batch)[0] for _ in range(2)]
        assert not torch.equal(noisy[0], noisy[1]), "dropout was never on: the test would be void"
        assert DPOConfig().policy_dropout is False
        disable_lora_dropout(model)
        train_mode = dpo_logps(model, batch)[0]
        model.eval()
        torch.testing.assert_close(train_mode, dpo_logps(model, batch)[0], rtol=0, atol=0)


def test_dpo_loss_rejects_bad_settings():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, label_smoothing=0.7)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=0.0)
