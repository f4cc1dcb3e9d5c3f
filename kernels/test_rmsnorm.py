"""RMSNorm, Triton (interpreter on CPU) and torch sides, against a float64 reference."""
import pytest
import torch

from hippocrates.kernels import rmsnorm
from hippocrates.kernels._testing import (as_float64_leaves, assert_close64, device, dtypes_to_test, poisoned,  # noqa: F401
                              saved_bytes)

SIDES = {"triton": rmsnorm.rms_norm_triton, "torch": rmsnorm.rms_norm_torch}
SHAPES = [(1, 3), (3, 37), (2, 5, 100), (9, 257), (2, 3, 64)]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("dtype", dtypes_to_test())
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradients_match_float64(side, dtype, shape, poisoned):
    x = torch.randn(shape, dtype=dtype, device=device()).mul_(3).requires_grad_()
    weight = (1 + 0.5 * torch.randn(shape[-1], dtype=dtype, device=device())).requires_grad_()
    eps = 1e-5
    y = SIDES[side](x, weight, eps)
    dy = torch.randn_like(y)
    dx, dweight = torch.autograd.grad(y, (x, weight), dy)

    x64, w64 = as_float64_leaves(x, weight)
    y64 = rmsnorm.rms_norm_reference(x64, w64, eps)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
    assert y.dtype == dtype
    assert_close64(y, y64, dtype, "y")
    assert_close64(dx, dx64, dtype, "dx")
    assert_close64(dweight, dw64, dtype, "dweight")


@pytest.mark.parametrize("side", SIDES)
def test_frozen_weight_and_mixed_dtypes(side):
    """fp16 activations with an fp32 frozen weight: output promoted like the reference, no dweight."""
    x = torch.randn(4, 6, 48, dtype=torch.float16, device=device(), requires_grad=True)
    weight = torch.randn(48, device=device())
    y = SIDES[side](x, weight, 1e-6)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    x64 = x.detach().double().requires_grad_()
    y64 = rmsnorm.rms_norm_reference(x64, weight.double(), 1e-6)
    (dx64,) = torch.autograd.grad(y64, x64, torch.ones_like(y64))
    assert y.dtype == torch.float32
    assert_close64(y, y64, torch.float16, "y")
    assert_close64(dx, dx64, torch.float16, "dx")


def test_torch_side_is_exact_and_saves_only_x_and_rstd():
    x = torch.randn(8, 33, 96, requires_grad=True)
    weight = torch.randn(96, requires_grad=True)
    expected = rmsnorm.rms_norm_reference(x, weight, 1e-6)
    kept, y = saved_bytes(rmsnorm.rms_norm_torch, x, weight, 1e-6, exclude=[x, weight])
    kept_reference, _ = saved_bytes(rmsnorm.rms_norm_reference, x, weight, 1e-6, exclude=[x, weight])
    assert torch.equal(y, expected)
    assert kept == 8 * 33 * 4  # rstd only (x and weight are inputs)
    assert kept_reference >= x.numel() * 4  # the reference keeps the normalized activations too


@pytest.mark.parametrize("side", SIDES)
def test_mismatched_weight_is_a_clear_error(side):
    with pytest.raises(ValueError, match="features"):
        SIDES[side](torch.randn(2, 8), torch.ones(7), 1e-6)
