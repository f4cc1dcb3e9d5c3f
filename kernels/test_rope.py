"""Fused RoPE (q and k in one pass), Triton (interpreter on CPU) and torch sides, against a float64 reference."""
import pytest
import torch

from hippocrates.kernels import rope
from hippocrates.kernels._testing import as_float64_leaves, assert_close64, device, dtypes_to_test, poisoned  # noqa: F401

SIDES = {"triton": rope.apply_rope_triton, "torch": rope.apply_rope_torch}


def model_cos_sin(b, t, d, dtype):
    """Real rotary tables (random positions), as the model builds them."""
    from hippocrates.models.transformer import rope_cos_sin
    positions = torch.randint(0, 500, (b, t), device=device())
    return rope_cos_sin(positions, d, 10000.0, dtype)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("dtype", dtypes_to_test())
@pytest.mark.parametrize("b,hq,hkv,t,d", [(1, 1, 1, 1, 2), (2, 6, 3, 7, 12), (1, 8, 1, 13, 32), (2, 4, 4, 5, 96)])
@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
def test_forward_and_gradients_match_float64(side, dtype, b, hq, hkv, t, d, layout, poisoned):
    def make(h):
        if layout == "bthd":  # the model's q/k: a [B, T, H, D] projection viewed as [B, H, T, D]
            return torch.randn(b, t, h, d, dtype=dtype, device=device()).transpose(1, 2).requires_grad_()
        return torch.randn(b, h, t, d, dtype=dtype, device=device(), requires_grad=True)

    q, k = make(hq), make(hkv)
    cos, sin = model_cos_sin(b, t, d, dtype)
    if d == 12:  # arbitrary tables: the kernel must not assume equal halves
        cos, sin = torch.randn_like(cos), torch.randn_like(sin)
    q_rot, k_rot = SIDES[side](q, k, cos, sin)
    dq_rot, dk_rot = torch.randn_like(q_rot), torch.randn_like(k_rot)
    dq, dk = torch.autograd.grad((q_rot, k_rot), (q, k), (dq_rot, dk_rot))

    q64, k64 = as_float64_leaves(q, k)
    q_rot64, k_rot64 = rope.apply_rope_reference(q64, k64, cos.double(), sin.double())
    dq64, dk64 = torch.autograd.grad((q_rot64, k_rot64), (q64, k64), (dq_rot.double(), dk_rot.double()))
    assert q_rot.dtype == dtype and k_rot.dtype == dtype
    for name, ours, expected in [("q_rot", q_rot, q_rot64), ("k_rot", k_rot, k_rot64), ("dq", dq, dq64),
                                 ("dk", dk, dk64)]:
        assert_close64(ours, expected, dtype, name)


@pytest.mark.parametrize("side", SIDES)
def test_only_q_used_downstream(side):
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    k = torch.randn(1, 1, 5, 8, requires_grad=True)
    cos, sin = model_cos_sin(1, 5, 8, torch.float32)
    q_rot, _ = SIDES[side](q, k, cos, sin)
    (dq,) = torch.autograd.grad(q_rot.sum(), q)
    q64 = q.detach().double().requires_grad_()
    (dq64,) = torch.autograd.grad(rope.apply_rope_reference(q64, k.double(), cos.double(), sin.double())[0].sum(), q64)
    assert_close64(dq, dq64, torch.float32, "dq")


def test_torch_side_matches_the_reference_to_rounding():
    """The in-place halves may fuse a multiply-add the reference rounds twice: at most a few fp32 ulps apart."""
    q = torch.randn(2, 8, 33, 64, requires_grad=True)
    k = torch.randn(2, 2, 33, 64, requires_grad=True)
    cos, sin = model_cos_sin(2, 33, 64, torch.float32)
    for ours, theirs in zip(rope.apply_rope_torch(q, k, cos, sin), rope.apply_rope_reference(q, k, cos, sin)):
        assert ours.shape == theirs.shape
        error = (ours - theirs).abs().max().item()
        assert error <= 4 * torch.finfo(torch.float32).eps * theirs.abs().max().item()


@pytest.mark.parametrize("side", SIDES)
def test_bad_shapes_are_a_clear_error(side):
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 1, 5, 8)
    with pytest.raises(ValueError, match="cos/sin"):
        SIDES[side](q, k, torch.randn(1, 4, 8), torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="even D"):
        SIDES[side](torch.randn(1, 2, 5, 7), torch.randn(1, 1, 5, 7), torch.randn(1, 5, 7), torch.randn(1, 5, 7))
