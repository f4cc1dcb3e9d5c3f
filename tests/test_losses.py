"""engine.losses against direct float64 computations on full logits (tiny random models, fresh inputs)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from hippocrates.engine.losses import (count_target_tokens, dpo_logps, dpo_loss, reference_logps, sequence_logps,
                           token_cross_entropy)
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


def logps_float64(model, input_ids, labels):
    """Independent: full logits, log_softmax + gather in float64."""
    logits = model(input_ids).double()  # [B, T, V]
    logprobs = logits.log_softmax(dim=-1)
    mask = labels != -100
    picked = logprobs.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)  # [B, T]
    return (picked * mask).sum(dim=-1)


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


def dpo_formula_float64(pc, pr, rc, rr, beta, loss_type, eps):
    """The papers' formulas, element by element in Python floats."""
    losses = []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        z = (a - b) - (c - d)
        if loss_type == "sigmoid":
            sig = 1 / (1 + math.exp(-beta * z))
            losses.append(-(1 - eps) * math.log(sig) - eps * math.log(1 - sig))
        elif loss_type == "ipo":
            losses.append((z - 1 / (2 * beta)) ** 2)
        else:
            losses.append(max(0.0, 1 - beta * z))
    chosen_r = [beta * (a - c) for a, c in zip(pc.tolist(), rc.tolist())]
    rejected_r = [beta * (b - d) for b, d in zip(pr.tolist(), rr.tolist())]
    n = len(losses)
    metrics = {
        "rewards/chosen": sum(chosen_r) / n,
        "rewards/rejected": sum(rejected_r) / n,
        "rewards/accuracies": sum(x > y for x, y in zip(chosen_r, rejected_r)) / n,
        "rewards/margins": sum(x - y for x, y in zip(chosen_r, rejected_r)) / n,
        "logps/chosen": sum(pc.tolist()) / n,
        "logps/rejected": sum(pr.tolist()) / n,
    }
    return torch.tensor(losses, dtype=torch.float64), metrics


@pytest.fixture(scope="module")
def dpo_case():
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    model = tiny_model(seed=13)
    batch = random_dpo_batch(gen, pairs=4)
    base = base_copy(model, seed=13)
    with torch.no_grad():
        independent = tuple(logps_float64(m, batch[f"{s}_input_ids"], batch[f"{s}_labels"])
                            for m, s in ((model, "chosen"), (model, "rejected"), (base, "chosen"), (base, "rejected")))
    return model, base, batch, independent


def test_dpo_logps_policy_and_reference(dpo_case):
    model, base, batch, independent = dpo_case
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
                                                ("hinge", 0.3, 0.0)])
def test_dpo_loss_and_metrics_equal_the_formulas(dpo_case, loss_type, beta, eps):
    model, _, batch, independent = dpo_case
    logps = dpo_logps(model, batch)
    losses, metrics = dpo_loss(*logps, beta=beta, loss_type=loss_type, label_smoothing=eps)
    expected_losses, expected_metrics = dpo_formula_float64(*independent, beta, loss_type, eps)
    assert losses.shape == (4,)
    torch.testing.assert_close(losses.double(), expected_losses, rtol=1e-4, atol=1e-5)
    assert set(metrics) == set(expected_metrics)
    for name, value in expected_metrics.items():
        assert float(metrics[name]) == pytest.approx(value, rel=1e-4, abs=1e-5), name


def test_dpo_loss_gradient_matches_float64_autograd(dpo_case):
    model, base, batch, _ = dpo_case
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


def test_dpo_loss_rejects_bad_settings():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, label_smoothing=0.7)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=0.0)
