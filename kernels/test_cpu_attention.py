"""kernels/cpu_attention.py against a float64 softmax(QK^T) V written out here, and the CPU dispatch in kernels/ops.py."""
import threading

import pytest
import torch

from hippocrates.kernels import cpu_attention, ops
from hippocrates.kernels._testing import assert_close64, poisoned_allocations


def reference(q, k, v, segment_ids, window=None):
    """Causal attention within documents, every score written out: q [B, Hq, T, D], k/v [B, Hkv, T, D]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [B, Hq, T, D]
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # [B, Hq, T, T]
    pos = torch.arange(q.shape[2])
    visible = (pos[None, :] <= pos[:, None]) & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    if window is not None:
        visible &= pos[:, None] - pos[None, :] < window
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1) @ v


@pytest.fixture(params=["native", "torch"])
def elementwise_side(request, monkeypatch):
    """The blocked loop's elementwise steps by the fused C kernels (the default) or by torch ops (the fallback)."""
    monkeypatch.setenv("HIPPO_KERNELS", request.param)
    return request.param


def packed_inputs(b, t, hq, hkv, d, generator):
    """q, k, v as views of one projection output ([B, T, H, D] memory, as the model makes them) and random cuts."""
    x = torch.randn(b, t, (hq + 2 * hkv) * d, generator=generator)
    q = x[..., :hq * d].view(b, t, hq, d).transpose(1, 2)
    k = x[..., hq * d:(hq + hkv) * d].view(b, t, hkv, d).transpose(1, 2)
    v = x[..., (hq + hkv) * d:].view(b, t, hkv, d).transpose(1, 2)
    starts = torch.rand(b, t, generator=generator) < 0.08  # about one document start in 12 positions
    starts[:, 0] = False
    segment_ids = starts.cumsum(dim=1)  # [B, T]
    return [a.detach().requires_grad_() for a in (q, k, v)], segment_ids


@pytest.mark.parametrize("b,t,hq,hkv,d", [(2, 37, 4, 2, 16), (3, 64, 6, 3, 32), (1, 20, 2, 2, 8)])
def test_packed_attention_matches_float64_reference(b, t, hq, hkv, d, elementwise_side):
    generator = torch.Generator().manual_seed(t)
    (q, k, v), segment_ids = packed_inputs(b, t, hq, hkv, d, generator)
    spans = cpu_attention.document_spans(segment_ids)
    assert sum(len(row) for row in spans) > b, "the inputs should pack several documents"
    inputs = [a.detach().clone() for a in (q, k, v)]
    with poisoned_allocations():
        out = cpu_attention.packed_causal_attention(q, k, v, spans)
        grad_out = torch.randn(out.shape, generator=generator)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    assert all(torch.equal(a, before) for a, before in zip((q, k, v), inputs)), "the inputs were written to"
    q64, k64, v64 = [a.detach().double().requires_grad_() for a in (q, k, v)]
    expected = reference(q64, k64, v64, segment_ids)
    expected_grads = torch.autograd.grad(expected, (q64, k64, v64), grad_out.double())
    assert_close64(out, expected, torch.float32, "out")
    for name, grad, expected_grad in zip("qkv", grads, expected_grads):
        assert_close64(grad, expected_grad, torch.float32, f"d{name}")


@pytest.mark.parametrize("query_block,t,logit_scale", [(8, 45, 1.0), (None, 700, 1.0), (8, 45, 30.0)])
def test_blocked_loop_on_long_documents_matches_float64_reference(query_block, t, logit_scale, monkeypatch,
                                                                  elementwise_side):
    """Documents longer than a block of queries: small blocks with a ragged last one, the real block on a
    700-token row, and logits so large that the masked future keys' exponentials would overflow to inf."""
    if query_block is not None:
        monkeypatch.setattr(cpu_attention, "QUERY_BLOCK", query_block)
    generator = torch.Generator().manual_seed(t)
    (q, k, v), _ = packed_inputs(2, t, 6, 2, 16, generator)
    q = (q.detach() * logit_scale).requires_grad_()
    cut = torch.randint(1, t - 1, (2,), generator=generator)
    segment_ids = (torch.arange(t)[None, :] >= cut[:, None]).long()  # two documents per row
    spans = cpu_attention.document_spans(segment_ids)
    assert max(e - s for row in spans for s, e in row) > 2 * cpu_attention.QUERY_BLOCK
    out = cpu_attention.packed_causal_attention(q, k, v, spans)
    grad_out = torch.randn(out.shape, generator=generator)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = [a.detach().double().requires_grad_() for a in (q, k, v)]
    expected = reference(q64, k64, v64, segment_ids)
    expected_grads = torch.autograd.grad(expected, (q64, k64, v64), grad_out.double())
    assert_close64(out, expected, torch.float32, "out")
    for name, grad, expected_grad in zip("qkv", grads, expected_grads):
        assert_close64(grad, expected_grad, torch.float32, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes(dtype):
    """16-bit q, k, v (computed in fp32) and fp64 ones (computed in fp64): outputs and gradients in their dtype,
    within its rounding of the float64 reference."""
    generator = torch.Generator().manual_seed(3)
    (q, k, v), segment_ids = packed_inputs(2, 150, 4, 2, 32, generator)
    q, k, v = [a.detach().to(dtype).requires_grad_() for a in (q, k, v)]
    out = cpu_attention.packed_causal_attention(q, k, v, cpu_attention.document_spans(segment_ids))
    grad_out = torch.randn(out.shape, generator=generator).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = [a.detach().double().requires_grad_() for a in (q, k, v)]
    expected = reference(q64, k64, v64, segment_ids)
    expected_grads = torch.autograd.grad(expected, (q64, k64, v64), grad_out.double())
    assert out.dtype == dtype and all(grad.dtype == dtype for grad in grads)
    assert_close64(out, expected, dtype, "out")
    for name, grad, expected_grad in zip("qkv", grads, expected_grads):
        assert_close64(grad, expected_grad, dtype, f"d{name}")


def test_document_spans():
    segment_ids = torch.tensor([[0, 0, 1, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert cpu_attention.document_spans(segment_ids) == [[(0, 2), (2, 5), (5, 6)], [(0, 6)]]
    assert cpu_attention.document_spans(torch.tensor([[0, 1, 0]])) is None  # a document in two runs


def test_cpu_dispatch(monkeypatch):
    """Packed causal rows take the packed node; a binding window or a split document the SDPA path, same math."""
    monkeypatch.setenv("HIPPO_KERNELS", "torch")
    calls = {"packed": 0}
    real = cpu_attention.packed_causal_attention

    def counted(*args, **kwargs):
        calls["packed"] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(cpu_attention, "packed_causal_attention", counted)
    (q, k, v), segment_ids = packed_inputs(2, 24, 4, 2, 8, torch.Generator().manual_seed(0))
    q64, k64, v64 = [a.detach().double() for a in (q, k, v)]
    for window, split_document, packed in [(None, False, 1), (64, False, 1), (5, False, 0), (None, True, 0)]:
        ids = segment_ids.clone()
        if split_document:
            ids[:, -3:] = 0  # document 0 comes back at the end of each row
        out = ops.attention(q, k, v, causal=True, sliding_window=window, segment_ids=ids)
        assert_close64(out, reference(q64, k64, v64, ids, window), torch.float32, f"window={window}")
        assert calls["packed"] == packed, f"window={window}, split={split_document}: packed node called {calls}"
        calls["packed"] = 0


def test_parallel_units_cover_each_document_once_on_the_workers():
    """Documents run on single-threaded workers, longest first; one with more than a worker's share of the work
    is cut into its K/V heads. The caller keeps its thread count, the workers take its grad and inference modes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []

        def record(unit):
            seen.append((unit, threading.current_thread().name, torch.is_grad_enabled(),
                         torch.is_inference_mode_enabled(), torch.get_num_threads()))
        pieces = [(1, 0, 10), (0, 0, 400), (1, 10, 30)]  # the 400-token document is over half of the work
        with torch.no_grad():
            cpu_attention.parallel_units(record, pieces, 3, torch.device("cpu"))
        with torch.inference_mode():
            cpu_attention.parallel_units(record, pieces, 3, torch.device("cpu"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    units = sorted(unit for unit, *_ in seen[:5])
    assert units == [(0, 0, 400, 0, 1), (0, 0, 400, 1, 2), (0, 0, 400, 2, 3), (1, 0, 10, 0, 3), (1, 10, 30, 0, 3)]
    assert all(name.startswith("hippo-cpu") and not grad and workers == 1 for _, name, grad, _, workers in seen)
    assert [inference for *_, inference, _ in seen] == [False] * 5 + [True] * 5
