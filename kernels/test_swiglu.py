"""SwiGLU, Triton (interpreter on CPU) and torch sides, against a float64 reference."""
import pytest
import torch

from hippocrates.kernels import activation
from hippocrates.kernels._testing import (as_float64_leaves, assert_close64, device, dtypes_to_test, poisoned,  # noqa: F401
                              saved_bytes)

SIDES = {"triton": activation.swiglu_triton, "torch": activation.swiglu_torch}


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("dtype", dtypes_to_test())
@pytest.mark.parametrize("shape", [(1,), (3, 37), (2, 7, 300), (1025,)])
def test_forward_and_gradients_match_float64(side, dtype, shape, poisoned):
    gate = torch.randn(shape, dtype=dtype, device=device()).mul_(4).requires_grad_()
    up = torch.randn(shape, dtype=dtype, device=device(), requires_grad=True)
    y = SIDES[side](gate, up)
    dy = torch.randn_like(y)
    dgate, dup = torch.autograd.grad(y, (gate, up), dy)

    gate64, up64 = as_float64_leaves(gate, up)
    y64 = activation.swiglu_reference(gate64, up64)
    dgate64, dup64 = torch.autograd.grad(y64, (gate64, up64), dy.double())
    assert y.dtype == dtype
    assert_close64(y, y64, dtype, "y")
    assert_close64(dgate, dgate64, dtype, "dgate")
    assert_close64(dup, dup64, dtype, "dup")


def test_torch_side_is_exact_and_saves_only_its_inputs():
    gate = torch.randn(4, 33, 160, requires_grad=True)
    up = torch.randn(4, 33, 160, requires_grad=True)
    kept, y = saved_bytes(activation.swiglu_torch, gate, up, exclude=[gate, up])
    kept_reference, y_reference = saved_bytes(activation.swiglu_reference, gate, up, exclude=[gate, up])
    dy = torch.randn_like(y)
    assert torch.equal(y, y_reference)
    for ours, theirs in zip(torch.autograd.grad(y, (gate, up), dy), torch.autograd.grad(y_reference, (gate, up), dy)):
        assert torch.equal(ours, theirs)
    assert kept == 0
    assert kept_reference == gate.numel() * 4  # the reference also keeps silu(gate)


@pytest.mark.parametrize("side", SIDES)
def test_mismatched_shapes_are_a_clear_error(side):
    with pytest.raises(ValueError, match="gate"):
        SIDES[side](torch.randn(2, 8), torch.randn(2, 9))
