"""LoRA linear, Triton (interpreter on CPU) and torch sides, against a float64 reference."""
import pytest
import torch

from hippocrates.kernels import lora
from hippocrates.kernels._testing import (as_float64_leaves, assert_close64, device, dtypes_to_test, poisoned,  # noqa: F401
                              saved_bytes)

SIDES = {"triton": lora.lora_linear_triton, "torch": lora.lora_linear_torch}


def make_inputs(lead, k, n, r, dtype, weight_grad=False, x_grad=True):
    x = torch.randn(*lead, k, dtype=dtype, device=device()).requires_grad_(x_grad)
    weight = (torch.randn(n, k, dtype=dtype, device=device()) / k ** 0.5).requires_grad_(weight_grad)
    lora_a = (torch.randn(r, k, dtype=dtype, device=device()) / k ** 0.5).requires_grad_()
    lora_b = (torch.randn(n, r, dtype=dtype, device=device()) / r ** 0.5).requires_grad_()
    return x, weight, lora_a, lora_b


def check_against_float64(side, inputs, scale, dtype):
    y = SIDES[side](*inputs, scale)
    dy = torch.randn_like(y)
    wanted = [t for t in inputs if t.requires_grad]
    grads = torch.autograd.grad(y, wanted, dy)
    inputs64 = as_float64_leaves(*inputs)
    y64 = lora.lora_linear_reference(*inputs64, scale)
    grads64 = torch.autograd.grad(y64, [t for t in inputs64 if t.requires_grad], dy.double())
    assert y.dtype == dtype
    assert_close64(y, y64, dtype, "y")
    names = [name for name, t in zip(["dx", "dweight", "dlora_a", "dlora_b"], inputs) if t.requires_grad]
    for name, ours, expected in zip(names, grads, grads64):
        assert_close64(ours, expected, dtype, name)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("dtype", dtypes_to_test())
@pytest.mark.parametrize("lead,k,n,r", [((1,), 16, 16, 1), ((3, 29), 70, 45, 5), ((67,), 96, 130, 16),
                                        ((2, 9), 33, 64, 20)])
def test_forward_and_gradients_match_float64(side, dtype, lead, k, n, r, poisoned):
    check_against_float64(side, make_inputs(lead, k, n, r, dtype), 2.0, dtype)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("weight_grad,x_grad", [(True, True), (False, False)])
def test_unfrozen_weight_and_input_without_grad(side, weight_grad, x_grad, poisoned):
    inputs = make_inputs((5, 7), 40, 24, 4, torch.float32, weight_grad=weight_grad, x_grad=x_grad)
    check_against_float64(side, inputs, 0.5, torch.float32)


def test_torch_side_matches_reference_and_saves_only_x_and_xa():
    x, weight, lora_a, lora_b = make_inputs((4, 33), 96, 80, 8, torch.float32)
    params = [weight, lora_a, lora_b]
    kept, y = saved_bytes(lora.lora_linear_torch, x, *params, 2.0, exclude=[x, *params])
    y_reference = lora.lora_linear_reference(x, *params, 2.0)
    assert torch.equal(y, y_reference)
    assert kept == 4 * 33 * 8 * 4  # xa = x A^T only


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weight_grad,x_grad", [(False, True), (True, True), (False, False)])
def test_linears_sharing_an_input_match_float64(dtype, weight_grad, x_grad, poisoned):
    """q/k/v-like projections of one x through the torch side's stacked-A op: outputs and every gradient."""
    x = torch.randn(3, 21, 48, dtype=dtype, requires_grad=x_grad)
    projections = [make_inputs((1,), 48, n, r, dtype, weight_grad=weight_grad)[1:] for n, r in [(40, 4), (24, 7),
                                                                                                 (24, 1)]]
    scales = [2.0, 0.5, 3.0]
    outputs = lora.lora_linears_torch(x, projections, scales)
    leaves = [t for t in [x, *(t for projection in projections for t in projection)] if t.requires_grad]
    dys = [torch.randn_like(y) for y in outputs]
    grads = torch.autograd.grad(outputs, leaves, dys)
    x64, *flat64 = as_float64_leaves(x, *(t for projection in projections for t in projection))
    outputs64 = lora.lora_linears_reference(x64, [flat64[i:i + 3] for i in range(0, len(flat64), 3)], scales)
    grads64 = torch.autograd.grad(outputs64, [t for t in [x64, *flat64] if t.requires_grad],
                                  [dy.double() for dy in dys])
    for i, (y, y64) in enumerate(zip(outputs, outputs64)):
        assert_close64(y, y64, dtype, f"y{i}")
    assert len(grads) == len(grads64) == len(leaves)
    for i, (ours, expected) in enumerate(zip(grads, grads64)):
        assert_close64(ours, expected, dtype, f"gradient {i}")


def test_linears_sharing_an_input_save_x_and_one_stacked_xa():
    x = torch.randn(4, 33, 96, requires_grad=True)
    projections = [make_inputs((1,), 96, n, r, torch.float32)[1:] for n, r in [(80, 8), (32, 8), (32, 4)]]
    flat = [t for projection in projections for t in projection]
    kept, outputs = saved_bytes(lora.lora_linears_torch, x, projections, [2.0, 2.0, 1.0], exclude=[x, *flat])
    for y, expected in zip(outputs, lora.lora_linears_reference(x, projections, [2.0, 2.0, 1.0])):
        torch.testing.assert_close(y, expected)
    assert kept == 4 * 33 * (8 + 8 + 4) * 4  # xa = x [A_1; A_2; A_3]^T only


@pytest.mark.parametrize("side", SIDES)
def test_mismatched_shapes_are_a_clear_error(side):
    x, weight, lora_a, lora_b = make_inputs((2,), 16, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="lora_linear"):
        SIDES[side](x, weight, lora_a[:, :15], lora_b, 1.0)


@pytest.mark.parametrize("r", [8, 64, 128])
def test_gpu_tiles_every_rank_tile(r, monkeypatch, poisoned):
    """The GPU tile sizes (rank tile up to 128, M/N/K tiles shrinking with it) under the interpreter."""
    monkeypatch.setattr(lora, "GPU_TILES_ON_CPU", True)
    check_against_float64("triton", make_inputs((70,), 96, 130, r, torch.float32), 2.0, torch.float32)


def test_rank_above_the_kernel_tile_is_a_clear_error():
    x, weight, lora_a, lora_b = make_inputs((2,), 16, 8, 129, torch.float32)
    with pytest.raises(ValueError, match="rank 129"):
        lora.lora_linear_triton(x, weight, lora_a, lora_b, 1.0)
    lora.lora_linear_torch(x, weight, lora_a, lora_b, 1.0)  # the torch side has no rank bound


def test_cuda_defaults_to_the_torch_side(monkeypatch):
    from hippocrates.kernels import ops

    class FakeCuda:
        is_cuda = True
    monkeypatch.delenv("HIPPO_KERNELS", raising=False)
    assert not ops.use_triton(FakeCuda(), cuda_default=False) and ops.use_triton(FakeCuda())
    monkeypatch.setenv("HIPPO_KERNELS", "triton")
    assert ops.use_triton(FakeCuda(), cuda_default=False)
