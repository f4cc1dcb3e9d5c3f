"""The fused C kernels of the CPU (kernels/native.py): against float64 references, split between threads, the
dispatch in kernels/ops.py, and the build's failure path."""
import os
import subprocess
import sys

import pytest
import torch

from hippocrates.kernels import activation, cross_entropy as ce, native, ops, rmsnorm, rope
from hippocrates.kernels._testing import as_float64_leaves, assert_close64

# The largest shapes hold more than native.MIN_PARALLEL_ELEMENTS elements: two threads split them.
pytestmark = pytest.mark.usefixtures("two_threads")


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_the_kernels_build_here():
    """CI's machine has a C compiler: the native side must build there, not fall back unseen."""
    assert native.available(), native._build_error


@pytest.mark.parametrize("shape", [(1,), (3, 37), (1025,), (4, 64, 300)])
def test_swiglu_matches_float64(shape):
    gate = torch.randn(shape).mul_(4)
    gate.view(-1)[:2] = torch.tensor([90.0, -90.0])[:gate.numel()]  # exp overflows: silu must stay finite
    gate.requires_grad_()
    up = torch.randn(shape, requires_grad=True)
    y = activation.swiglu_native(gate, up)
    dy = torch.randn_like(y)
    dgate, dup = torch.autograd.grad(y, (gate, up), dy)
    gate64, up64 = as_float64_leaves(gate, up)
    y64 = activation.swiglu_reference(gate64, up64)
    dgate64, dup64 = torch.autograd.grad(y64, (gate64, up64), dy.double())
    for name, ours, expected in [("y", y, y64), ("dgate", dgate, dgate64), ("dup", dup, dup64)]:
        assert_close64(ours, expected, torch.float32, name)


@pytest.mark.parametrize("shape", [(1, 3), (9, 257), (2, 5, 100), (4, 512, 96)])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_rms_norm_matches_float64(shape, weight_grad):
    x = torch.randn(shape).mul_(3).requires_grad_()
    weight = (1 + 0.5 * torch.randn(shape[-1])).requires_grad_(weight_grad)
    y = rmsnorm.rms_norm_native(x, weight, 1e-5)
    dy = torch.randn_like(y)
    wanted = (x, weight) if weight_grad else (x,)
    grads = torch.autograd.grad(y, wanted, dy)
    x64, w64 = as_float64_leaves(x, weight)
    y64 = rmsnorm.rms_norm_reference(x64, w64, 1e-5)
    grads64 = torch.autograd.grad(y64, (x64, w64) if weight_grad else (x64,), dy.double())
    assert_close64(y, y64, torch.float32, "y")
    for name, ours, expected in zip(["dx", "dweight"], grads, grads64):
        assert_close64(ours, expected, torch.float32, name)


@pytest.mark.parametrize("b,hq,hkv,t,d", [(1, 1, 1, 1, 2), (2, 6, 3, 7, 12), (2, 9, 3, 300, 64)])
def test_rope_matches_float64(b, hq, hkv, t, d):
    """q, k as the model makes them: [B, T, H, D] projections viewed as [B, H, T, D]."""
    q = torch.randn(b, t, hq, d).transpose(1, 2).requires_grad_()
    k = torch.randn(b, t, hkv, d).transpose(1, 2).requires_grad_()
    cos, sin = torch.randn(b, t, d), torch.randn(b, t, d)  # arbitrary tables: no symmetry between the halves
    q_rot, k_rot = rope.apply_rope_native(q, k, cos, sin)
    dq_rot, dk_rot = torch.randn_like(q_rot), torch.randn_like(k_rot).contiguous()  # dk in another layout
    dq, dk = torch.autograd.grad((q_rot, k_rot), (q, k), (dq_rot, dk_rot))
    q64, k64 = as_float64_leaves(q, k)
    q_rot64, k_rot64 = rope.apply_rope_reference(q64, k64, cos.double(), sin.double())
    dq64, dk64 = torch.autograd.grad((q_rot64, k_rot64), (q64, k64), (dq_rot.double(), dk_rot.double()))
    assert native.heads_last(q_rot) and native.heads_last(k_rot)
    for name, ours, expected in [("q_rot", q_rot, q_rot64), ("k_rot", k_rot, k_rot64), ("dq", dq, dq64),
                                 ("dk", dk, dk64)]:
        assert_close64(ours, expected, torch.float32, name)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n,v,chunk", [(1, 7, None), (37, 101, 8), (70, 5000, 64)])
def test_cross_entropy_matches_float64(reduction, n, v, chunk):
    hidden = torch.randn(n, 24, requires_grad=True)
    weight = (torch.randn(v, 24) * 0.4).requires_grad_()
    labels = torch.randint(0, v, (n,))
    labels[torch.randperm(n)[: n // 3]] = -100
    loss = ce.fused_linear_cross_entropy_native(hidden, weight, labels, reduction=reduction, chunk_size=chunk)
    upstream = torch.randn_like(loss)
    grads = torch.autograd.grad(loss, (hidden, weight), upstream)
    hidden64, weight64 = as_float64_leaves(hidden, weight)
    loss64 = ce.fused_linear_cross_entropy_reference(hidden64, weight64, labels, -100, reduction)
    grads64 = torch.autograd.grad(loss64, (hidden64, weight64), upstream.double())
    assert_close64(loss, loss64, torch.float32, "loss")
    for name, ours, expected in zip(["dhidden", "dweight"], grads, grads64):
        assert_close64(ours, expected, torch.float32, name)


def test_one_thread_and_two_give_the_same_bits():
    x = torch.randn(8, 300, 96)
    weight = torch.randn(96)
    with_two = native.rms_norm_forward(x, weight, 1e-6)[0], native.swiglu_forward(x, x.flip(0).contiguous())
    torch.set_num_threads(1)
    with_one = native.rms_norm_forward(x, weight, 1e-6)[0], native.swiglu_forward(x, x.flip(0).contiguous())
    assert all(torch.equal(a, b) for a, b in zip(with_two, with_one))


def test_loading_the_library_keeps_denormals():
    """Built with -ffast-math but linked without it: no crtfastmath.o flushing denormals process-wide."""
    native.library()
    tiny = torch.tensor([1e-40]) * torch.tensor([1.0])
    assert tiny.item() > 0
    out = native.swiglu_forward(torch.full((4,), 1e-30), torch.full((4,), 1e-10))  # silu(1e-30) 1e-10 = 5e-41
    assert (out > 0).all()


def test_ops_take_the_native_side_by_default_and_torch_when_forced(monkeypatch):
    gate, up = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)
    monkeypatch.delenv("HIPPO_KERNELS", raising=False)
    assert type(ops.swiglu(gate, up).grad_fn).__name__ == "SwiGLUNativeBackward"
    assert type(ops.rms_norm(gate, torch.ones(8), 1e-6).grad_fn).__name__ == "RMSNormNativeBackward"
    assert type(ops.swiglu(gate.double(), up.double()).grad_fn).__name__ == "SwiGLUTorchBackward"  # fp64: torch
    monkeypatch.setenv("HIPPO_KERNELS", "torch")
    assert type(ops.swiglu(gate, up).grad_fn).__name__ == "SwiGLUTorchBackward"


def test_the_native_side_rejects_what_it_cannot_take():
    with pytest.raises(ValueError, match="swiglu: the native side takes contiguous fp32 CPU tensors"):
        activation.swiglu_native(torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="rms_norm: the native side"):
        rmsnorm.rms_norm_native(torch.randn(8, 4).T, torch.ones(8), 1e-6)


def test_without_a_compiler_one_warning_and_the_torch_ops_run(tmp_path):
    script = ("import torch, warnings\n"
              "from hippocrates.kernels import ops, activation\n"
              "g, u = torch.randn(3, 5), torch.randn(3, 5)\n"
              "assert torch.equal(ops.swiglu(g, u), activation.swiglu_reference(g, u))\n"
              "ops.swiglu(g, u)\n")
    env = dict(os.environ, CC="/bin/false", HIPPO_CACHE_DIR=str(tmp_path))
    env.pop("HIPPO_KERNELS", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("the fused CPU kernels are off") == 1, done.stderr
    assert not list(tmp_path.glob("native/*.so"))
