"""Fused linear + cross-entropy, Triton rows (interpreter on CPU) and torch sides, against a float64 reference."""
import pytest
import torch

from hippocrates.kernels import cross_entropy as ce
from hippocrates.kernels._testing import (as_float64_leaves, assert_close64, device, dtypes_to_test, poisoned,  # noqa: F401
                              saved_bytes)

SIDES = {"triton": ce.fused_linear_cross_entropy_triton, "torch": ce.fused_linear_cross_entropy_torch}
IGNORE = -100


def make_inputs(n, h, v, dtype, ignored_every=3, weight_grad=True, on=None):
    on = on or device()
    hidden = torch.randn(n, h, dtype=dtype, device=on, requires_grad=True)
    weight = (torch.randn(v, h, dtype=dtype, device=on) * 2 / h ** 0.5).requires_grad_(weight_grad)
    labels = torch.randint(0, v, (n,), device=on)
    if ignored_every:
        labels[torch.randperm(n, device=on)[: n // ignored_every]] = IGNORE
    return hidden, weight, labels


def check_against_float64(side, hidden, weight, labels, reduction, dtype, chunk_size):
    loss = SIDES[side](hidden, weight, labels, ignore_index=IGNORE, reduction=reduction, chunk_size=chunk_size)
    upstream = torch.randn_like(loss)
    wanted = [t for t in (hidden, weight) if t.requires_grad]
    grads = torch.autograd.grad(loss, wanted, upstream)
    hidden64, weight64 = as_float64_leaves(hidden, weight)
    loss64 = ce.fused_linear_cross_entropy_reference(hidden64, weight64, labels, IGNORE, reduction)
    grads64 = torch.autograd.grad(loss64, [t for t in (hidden64, weight64) if t.requires_grad], upstream.double())
    assert loss.dtype == torch.float32 and loss.shape == loss64.shape
    assert_close64(loss, loss64, dtype, "loss")
    names = [name for name, t in zip(["dhidden", "dweight"], (hidden, weight)) if t.requires_grad]
    for name, ours, expected in zip(names, grads, grads64):
        assert ours.dtype == dtype
        assert_close64(ours, expected, dtype, name)
    if reduction == "none":
        assert (loss[labels == IGNORE] == 0).all()


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("dtype", dtypes_to_test())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n,h,v,chunk", [(1, 16, 7, None), (37, 24, 101, 8), (50, 40, 300, 64), (19, 16, 5000, 6)])
def test_loss_and_gradients_match_float64(side, dtype, reduction, n, h, v, chunk, poisoned):
    check_against_float64(side, *make_inputs(n, h, v, dtype, ignored_every=3 if n > 1 else 0), reduction, dtype,
                          chunk)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_frozen_weight_and_batched_labels(side, reduction, poisoned):
    """[B, T, H] hidden with [B, T] labels; a frozen (LoRA) LM head gets no gradient."""
    hidden, weight, labels = make_inputs(2 * 13, 32, 77, torch.float32, weight_grad=False)
    loss = SIDES[side](hidden.view(2, 13, 32), weight, labels.view(2, 13), reduction=reduction, chunk_size=5)
    assert loss.shape == (() if reduction == "mean" else (2, 13))
    check_against_float64(side, hidden, weight, labels, reduction, torch.float32, 5)


@pytest.mark.parametrize("side", SIDES)
def test_all_labels_ignored_matches_reference(side):
    hidden, weight, labels = make_inputs(6, 16, 11, torch.float32)
    labels[:] = IGNORE
    loss = SIDES[side](hidden, weight, labels)
    loss.backward()
    reference = ce.fused_linear_cross_entropy_reference(hidden, weight, labels)
    assert torch.isnan(loss) and torch.isnan(reference)
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


def test_no_logits_kept_and_no_grad_mode():
    hidden, weight, labels = make_inputs(64, 32, 1000, torch.float32)
    kept, loss = saved_bytes(ce.fused_linear_cross_entropy_torch, hidden, weight, labels, IGNORE, "mean", 16,
                             exclude=[hidden, weight, labels])
    kept_reference, _ = saved_bytes(ce.fused_linear_cross_entropy_reference, hidden, weight, labels,
                                    exclude=[hidden, weight, labels])
    assert kept <= (64 * 32 + 1000 * 32) * 4 + 64  # dh [N, H] and dW [V, H] (fp32) only
    assert kept_reference >= 64 * 1000 * 4  # the reference keeps [N, V] logits
    with torch.no_grad():
        assert torch.allclose(ce.fused_linear_cross_entropy_torch(hidden, weight, labels), loss)


@pytest.mark.parametrize("side", SIDES)
def test_bad_labels_and_reduction_are_clear_errors(side):
    hidden, weight, labels = make_inputs(4, 8, 10, torch.float32)
    labels[2] = 10
    with pytest.raises(ValueError, match="label 10 is outside the vocabulary"):
        SIDES[side](hidden, weight, labels)
    with pytest.raises(ValueError, match="reduction"):
        SIDES[side](hidden, weight, labels.clamp(max=9), reduction="avg")


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("dtype", dtypes_to_test())
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_second_backward_with_retain_graph(side, dtype, reduction):
    """The gradient is computed in the forward and only scaled in the backward: a second backward through the same
    graph (retain_graph) must give the same gradients, scaled by its own grad_output."""
    hidden, weight, labels = make_inputs(29, 24, 101, dtype)
    loss = SIDES[side](hidden, weight, labels, ignore_index=IGNORE, reduction=reduction, chunk_size=8)
    first = torch.autograd.grad(loss, (hidden, weight), torch.tensor(1.0, device=loss.device), retain_graph=True)
    second = torch.autograd.grad(loss, (hidden, weight), torch.tensor(3.0, device=loss.device))
    hidden64, weight64 = as_float64_leaves(hidden, weight)
    expected = torch.autograd.grad(ce.fused_linear_cross_entropy_reference(hidden64, weight64, labels, IGNORE,
                                                                            reduction), (hidden64, weight64))
    for name, a, b, e in zip(("dhidden", "dweight"), first, second, expected):
        assert_close64(a, e, dtype, name)
        assert_close64(b, 3 * e, dtype, f"{name} (second backward)")


def test_weight_gradient_accumulates_in_place():
    """16-bit chunks add into the fp32 [V, H] accumulator itself (addmm into it, no [V, H] product per chunk)."""
    v, h, c = 300, 40, 8
    dw = torch.zeros(v, h)
    storage = dw.data_ptr()
    grad, h_chunk = torch.randn(c, v, dtype=torch.float16), torch.randn(c, h, dtype=torch.float16)
    expected = grad.double().T @ h_chunk.double()
    for times in (1, 2):
        ce._accumulate_dw(dw, grad, h_chunk)
        torch.testing.assert_close(dw.double(), times * expected, atol=1e-3, rtol=1e-3)
    assert dw.data_ptr() == storage and dw.dtype == torch.float32


def test_cpu_logits_buffer_is_kept_between_calls_and_replaced_on_a_new_shape():
    """CPU: the [C, V] chunk buffer survives the call (no fresh mmap per step); a call with another vocabulary
    frees it for its own, and every call still matches the float64 reference."""
    ce._cpu_logits_buffers.clear()
    buffers = []
    for v in (96, 96, 80):
        hidden, weight, labels = make_inputs(20, 16, v, torch.float32, on="cpu")  # on CPU with a GPU too
        check_against_float64("torch", hidden, weight, labels, "mean", torch.float32, 8)
        assert list(ce._cpu_logits_buffers) == [(8, v, torch.float32)]
        buffers.append(ce._cpu_logits_buffers[(8, v, torch.float32)])
    assert buffers[1] is buffers[0] and buffers[2] is not buffers[0]
