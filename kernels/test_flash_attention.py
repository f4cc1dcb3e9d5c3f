"""Fused attention: the Triton kernels (interpreter on CPU) and the CPU torch path against a float64 reference.

Tolerances (max abs error, also relative to each tensor's scale): fp32 1e-5 abs + 1e-4 rel (the kernels use IEEE
fp32 dots; observed errors ~1e-6); fp16 1e-2 abs + 1e-2 rel (P is rounded to fp16 before P V and dS before
dS K, each ~5e-4 relative; observed ~2e-3); bf16 (GPU only) 4e-2 abs + 4e-2 rel.
Every output the kernels allocate is NaN-filled first (POISON_OUTPUTS), so an element they forget fails.
"""
import zlib

import pytest
import torch

from hippocrates.kernels import ops
from hippocrates.kernels import flash_attention as fa

TOLERANCES = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (4e-2, 4e-2)}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(fa, "POISON_OUTPUTS", True)


def packed_segment_ids(batch, length, n_docs, generator):
    """[B, T] ids of n_docs contiguous documents per row, random cut points (different per row)."""
    ids = torch.zeros(batch, length, dtype=torch.long)
    for row in range(batch):
        cuts = torch.randperm(length - 1, generator=generator)[:n_docs - 1] + 1
        for cut in cuts.tolist():
            ids[row, cut:] += 1
    return ids


def make_inputs(batch, hq, hkv, tq, tk, head_dim, dtype, seed, device="cpu", layout="bhtd"):
    gen = torch.Generator().manual_seed(seed)

    def rand(heads, length):
        if layout == "bthd":  # the model's layout: a [B, T, H, D] projection viewed as [B, H, T, D]
            return torch.randn(batch, length, heads, head_dim, generator=gen).transpose(1, 2)
        return torch.randn(batch, heads, length, head_dim, generator=gen)

    q, k, v, do = rand(hq, tq), rand(hkv, tk), rand(hkv, tk), rand(hq, tq)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, do)], gen


def float64_reference(q, k, v, do, causal, window, segment_ids):
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    seg = segment_ids.cpu() if segment_ids is not None else None
    out = fa.attention_reference(*leaves, causal=causal, sliding_window=window, segment_ids=seg)
    grads = torch.autograd.grad(out, leaves, do.cpu().double())
    return out.detach(), *grads


def run_attention(fn, q, k, v, do, causal, window, segment_ids):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, causal=causal, sliding_window=window, segment_ids=segment_ids)
    grads = torch.autograd.grad(out, leaves, do)
    return out.detach(), *grads


def assert_matches(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        assert a.shape == e.shape, name
        assert not torch.isnan(a).any(), f"{name}: NaN (an unwritten element of a poisoned buffer?)"
        scale = e.abs().max().item()
        torch.testing.assert_close(a.cpu().double(), e, atol=atol * max(1.0, scale), rtol=rtol, msg=name)


def check_against_reference(fn, batch, hq, hkv, tq, tk, head_dim, causal, window, n_docs, dtype, seed,
                            device="cpu", layout="bhtd"):
    (q, k, v, do), gen = make_inputs(batch, hq, hkv, tq, tk, head_dim, dtype, seed, device, layout)
    segment_ids = packed_segment_ids(batch, tk, n_docs, gen).to(device) if n_docs else None
    expected = float64_reference(q, k, v, do, causal, window, segment_ids)
    actual = run_attention(fn, q, k, v, do, causal, window, segment_ids)
    assert_matches(actual, expected, dtype)
    return actual


# (batch, Hq, Hkv, Tq, Tk, head_dim, causal, window, documents per row)
CASES = [
    (1, 2, 2, 1, 1, 32, True, None, 0),  # a single token
    (2, 2, 2, 17, 17, 32, True, None, 0),  # ragged last block
    (1, 4, 2, 17, 17, 64, False, None, 0),  # non-causal, GQA 2
    (1, 4, 1, 64, 64, 32, True, None, 0),  # GQA 4, whole blocks
    (1, 8, 1, 100, 100, 32, True, None, 0),  # GQA 8, ragged
    (1, 2, 2, 100, 100, 128, False, None, 0),
    (1, 2, 2, 64, 64, 96, True, None, 0),  # head dim padded to 128
    (1, 2, 1, 100, 100, 64, True, 16, 0),  # window shorter than T
    (1, 2, 1, 100, 100, 32, True, 300, 0),  # window longer than T
    (1, 2, 2, 64, 64, 32, False, 20, 0),  # window without causal: only the past is cut
    (2, 2, 1, 64, 64, 96, True, 24, 3),  # window and packed documents
    (1, 4, 1, 1, 100, 128, True, None, 0),  # decode: one query against a cache
    (1, 4, 2, 17, 100, 64, True, 32, 2),  # chunked prefill: Tq < Tk, window, documents
    (1, 2, 1, 30, 10, 32, True, None, 0),  # Tq > Tk: the first 20 queries see no key (zero output)
]


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_triton_fp32_matches_float64(case):
    check_against_reference(fa.attention_triton, *case, dtype=torch.float32, seed=zlib.crc32(repr(case).encode()))


@pytest.mark.parametrize("n_docs", [1, 2, 3, 4, 5])
def test_triton_packed_documents(n_docs):
    check_against_reference(fa.attention_triton, 2, 2, 1, 100, 100, 32, True, None, n_docs,
                            dtype=torch.float32, seed=n_docs)


@pytest.mark.parametrize("window", [1, 2, 15, 16, 17, 18, 33, 47, 48, 49, 50])
@pytest.mark.parametrize("tq", [100, 86])
def test_triton_window_edges(window, tq):
    """Windows at and around multiples of the tile sizes (16 and 32 under the interpreter) and a query offset of
    14 (Tk - Tq), where an off-by-one in a block range would drop or add a whole block."""
    check_against_reference(fa.attention_triton, 1, 1, 1, tq, 100, 32, True, window, 0, dtype=torch.float32,
                            seed=window * 1000 + tq)


@pytest.mark.parametrize("case", [
    (1, 4, 2, 64, 64, 64, True, None, 0),
    (1, 2, 1, 100, 100, 128, True, 16, 0),
    (2, 2, 1, 100, 100, 32, True, None, 3),
    (1, 4, 1, 17, 64, 96, False, None, 0),
])
def test_triton_fp16_matches_float64(case):
    check_against_reference(fa.attention_triton, *case, dtype=torch.float16, seed=7)


# The GPU tile sizes (128 x 64 forward, up to 64 x 128 dK/dV) and the GQA split of the dK/dV grid, run by the
# interpreter: lengths span a few GPU blocks, documents start and end inside and across blocks.
GPU_TILE_CASES = [
    (1, 4, 1, 260, 260, 64, True, None, 4),  # packed rows, GQA 4 (split dK/dV grid)
    (1, 2, 2, 260, 260, 16, True, None, 3),  # head dim 16
    (1, 2, 1, 200, 200, 128, True, 70, 2),  # window and documents, head dim 128
    (1, 2, 1, 150, 330, 32, True, None, 3),  # Tq < Tk with documents
    (1, 2, 1, 200, 200, 96, False, None, 3),  # documents without causal
]


@pytest.mark.parametrize("case", GPU_TILE_CASES, ids=[str(i) for i in range(len(GPU_TILE_CASES))])
def test_triton_gpu_tiles_match_float64(case, monkeypatch):
    monkeypatch.setattr(fa, "GPU_TILES_ON_CPU", True)
    check_against_reference(fa.attention_triton, *case, dtype=torch.float32, seed=zlib.crc32(repr(case).encode()))


def test_triton_gpu_tiles_fp16_packed(monkeypatch):
    monkeypatch.setattr(fa, "GPU_TILES_ON_CPU", True)
    check_against_reference(fa.attention_triton, 1, 2, 1, 200, 200, 64, True, None, 5, dtype=torch.float16, seed=31)


def test_gqa_split_is_used_with_few_programs(monkeypatch):
    """B x Hkv x key blocks far below the target: the dK/dV group of 8 query heads is split over programs."""
    monkeypatch.setattr(fa, "GPU_TILES_ON_CPU", True)
    dk, _ = fa.dkdv_outputs(torch.zeros(1, 1, 300, 64), n_heads=8, gpu=True)
    assert dk.shape[0] == 8 and dk.dtype == torch.float32
    dk, _ = fa.dkdv_outputs(torch.zeros(64, 8, 2048, 64), n_heads=32, gpu=True)
    assert dk.shape[0] == 1


@pytest.mark.parametrize("block_q,block_k", [(16, 32), (128, 64), (64, 128)])
def test_segment_ranges_cover_every_visible_pair(block_q, block_k):
    """Host-side document ranges: every (query, key) pair with equal ids lies inside its block's [lo, hi), and
    every pair inside [full_lo, full_hi) has equal ids; also for ids that repeat in separate runs."""
    gen = torch.Generator().manual_seed(block_q + block_k)
    tq, tk = 190, 300
    ids = torch.cat([packed_segment_ids(2, tk, 6, gen), torch.tensor([[0] * 100 + [1] * 100 + [0] * 100])])
    ranges = fa._SegmentRanges(ids, tq, tk, "cpu")
    fq = tk - tq
    same = ids[:, fq:, None] == ids[:, None, :]  # [B, Tq, Tk]
    for b, blocks in enumerate(ranges.key_ranges(block_q, block_k).tolist()):
        for j, (lo, hi, full_lo, full_hi) in enumerate(blocks):
            rows = same[b, j * block_q:(j + 1) * block_q]
            keys = rows.any(0).nonzero().flatten()
            assert lo % block_k == 0 and lo <= keys.min() and keys.max() < hi
            if full_lo < full_hi:
                assert full_lo % block_k == 0 and full_hi % block_k == 0 and rows[:, full_lo:full_hi].all()
    for b, blocks in enumerate(ranges.query_ranges(block_q, block_k).tolist()):
        for i, (lo, hi, full_lo, full_hi) in enumerate(blocks):
            cols = same[b, :, i * block_k:(i + 1) * block_k]
            rows = cols.any(1).nonzero().flatten()
            if len(rows):
                assert lo % block_q == 0 and lo <= rows.min() and rows.max() < hi
            if full_lo < min(full_hi, tq):
                assert cols[full_lo:full_hi].all()


def test_triton_interleaved_segment_ids(monkeypatch):
    """Ids that repeat in separate runs (a document in two pieces) stay exact on the Triton side too."""
    monkeypatch.setattr(fa, "GPU_TILES_ON_CPU", True)
    (q, k, v, do), _ = make_inputs(1, 2, 1, 200, 200, 32, torch.float32, seed=37)
    segment_ids = torch.tensor([[0] * 70 + [1] * 60 + [0] * 40 + [2] * 30])
    expected = float64_reference(q, k, v, do, False, None, segment_ids)
    assert_matches(run_attention(fa.attention_triton, q, k, v, do, False, None, segment_ids), expected,
                   torch.float32)


def test_triton_model_layout_and_output_strides():
    """q/k/v as transposed [B, T, H, D] views (what the model passes); o keeps q's layout, dq keeps q's."""
    out, dq, _, _ = check_against_reference(fa.attention_triton, 2, 4, 2, 33, 33, 32, True, None, 2,
                                            dtype=torch.float32, seed=3, layout="bthd")
    assert out.transpose(1, 2).is_contiguous() and dq.transpose(1, 2).is_contiguous()


def test_triton_fully_masked_rows_are_zero():
    (q, k, v, do), _ = make_inputs(1, 2, 1, 12, 5, 32, torch.float32, seed=11)
    out, dq, _, _ = run_attention(fa.attention_triton, q, k, v, do, True, None, None)
    assert torch.equal(out[:, :, :7], torch.zeros_like(out[:, :, :7]))
    assert torch.equal(dq[:, :, :7], torch.zeros_like(dq[:, :, :7]))


def test_triton_skips_blocks_no_query_sees():
    """NaN keys/values in blocks outside every query's window or document: a kernel that loaded them would leak
    NaN (0 * NaN) into the output; their gradients must be exactly 0."""
    block_n = fa._config("fwd", 32, gpu=False)[1]
    tq, tk, window = 8, 100, 20
    (q, k, v, do), _ = make_inputs(1, 4, 2, tq, tk, 32, torch.float32, seed=5)
    hidden = (tk - tq - window + 1) // block_n * block_n  # keys [0, hidden) are whole blocks nobody sees
    assert hidden >= 2 * block_n
    k[:, :, :hidden], v[:, :, :hidden] = float("nan"), float("nan")
    expected = float64_reference(q, k[:, :, hidden:], v[:, :, hidden:], do, True, window, None)
    out, dq, dk, dv = run_attention(fa.attention_triton, q, k, v, do, True, window, None)
    assert torch.equal(dk[:, :, :hidden], torch.zeros_like(dk[:, :, :hidden]))
    assert torch.equal(dv[:, :, :hidden], torch.zeros_like(dv[:, :, :hidden]))
    assert_matches((out, dq, dk[:, :, hidden:], dv[:, :, hidden:]), expected, torch.float32)

    # The same with documents instead of a window: the queries all lie in the last document.
    segment_ids = torch.zeros(1, tk, dtype=torch.long)
    segment_ids[:, hidden:] = 1
    expected = float64_reference(q, k[:, :, hidden:], v[:, :, hidden:], do, True, None, None)
    out, dq, dk, dv = run_attention(fa.attention_triton, q, k, v, do, True, None, segment_ids)
    assert torch.equal(dk[:, :, :hidden], torch.zeros_like(dk[:, :, :hidden]))
    assert_matches((out, dq, dk[:, :, hidden:], dv[:, :, hidden:]), expected, torch.float32)


def test_triton_backward_is_deterministic():
    (q, k, v, do), gen = make_inputs(1, 8, 2, 64, 64, 64, torch.float32, seed=13)
    segment_ids = packed_segment_ids(1, 64, 3, gen)
    first = run_attention(fa.attention_triton, q, k, v, do, True, 24, segment_ids)
    second = run_attention(fa.attention_triton, q, k, v, do, True, 24, segment_ids)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_poisoning_is_active():
    assert torch.isnan(fa._new_output(torch.zeros(3))).all()


# The CPU training path: torch's fused SDPA, per document for packed rows.
TORCH_CASES = CASES + [
    (2, 4, 2, 100, 100, 64, True, None, 1),
    (2, 4, 2, 100, 100, 64, True, None, 5),
    (2, 4, 4, 64, 64, 32, False, None, 4),  # documents without causal
    (1, 8, 2, 1, 100, 64, True, 8, 3),  # decode inside the last document
]


@pytest.mark.parametrize("case", TORCH_CASES, ids=[str(i) for i in range(len(TORCH_CASES))])
def test_torch_path_matches_float64(case):
    check_against_reference(fa.attention_torch, *case, dtype=torch.float32, seed=zlib.crc32(repr(case).encode()) + 1)


def test_torch_path_with_interleaved_segment_ids():
    """Ids that are not contiguous runs (a document in two pieces) take the masked fallback, still exact."""
    (q, k, v, do), _ = make_inputs(1, 4, 2, 40, 40, 32, torch.float32, seed=17)
    segment_ids = torch.tensor([[0] * 10 + [1] * 10 + [0] * 10 + [2] * 10])
    expected = float64_reference(q, k, v, do, True, None, segment_ids)
    actual = run_attention(fa.attention_torch, q, k, v, do, True, None, segment_ids)
    assert_matches(actual, expected, torch.float32)


@pytest.mark.parametrize("window,n_docs", [(None, 0), (None, 4), (40, 0), (40, 3)])
def test_torch_path_keeps_no_probabilities(window, n_docs):
    batch, hq, t = 2, 4, 128
    (q, k, v, _), gen = make_inputs(batch, hq, 2, t, t, 16, torch.float32, seed=19)
    segment_ids = packed_segment_ids(batch, t, n_docs, gen) if n_docs else None
    saved = []

    def keep(tensor):
        saved.append(tensor.numel())
        return tensor

    leaves = [x.requires_grad_() for x in (q, k, v)]
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        out = fa.attention_torch(*leaves, causal=True, sliding_window=window, segment_ids=segment_ids)
    assert saved and max(saved) < batch * hq * t * t // 4  # a [B, H, T, T] tensor would be 4x this bound
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    nodes = {node.name() for node in seen}
    assert "ScaledDotProductFlashAttentionForCpuBackward0" in nodes
    assert not any("Softmax" in name or "Bmm" in name for name in nodes), nodes  # the math backend's graph


@pytest.mark.parametrize("fn", [fa.attention_triton, fa.attention_torch])
def test_bad_inputs_raise_one_line_errors(fn):
    q, k = torch.zeros(1, 4, 8, 32), torch.zeros(1, 3, 8, 32)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        fn(q, k, k)
    with pytest.raises(ValueError, match="segment_ids must be"):
        fn(q, q, q, segment_ids=torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="sliding_window"):
        fn(q, q, q, sliding_window=0)
    with pytest.raises(ValueError, match=r"\[B, H, T, D\]"):
        fn(q[0], q[0], q[0])


def test_dispatch_forces_triton(monkeypatch):
    monkeypatch.setenv("HIPPO_KERNELS", "triton")
    (q, k, v, _), _ = make_inputs(1, 2, 1, 17, 17, 32, torch.float32, seed=23)
    expected = fa.attention_reference(q.double(), k.double(), v.double(), causal=True, sliding_window=8)
    torch.testing.assert_close(ops.attention(q, k, v, sliding_window=8).double(), expected,
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tq,tk,causal,window,n_docs", [
    (1, 1, True, None, 0), (37, 37, True, None, 0), (37, 37, False, 5, 0), (10, 53, True, 12, 0),
    (53, 53, True, None, 4), (20, 53, True, 9, 3), (30, 10, True, None, 0),
])
def test_flop_count_matches_mask(tq, tk, causal, window, n_docs):
    gen = torch.Generator().manual_seed(tq * 100 + tk)
    segment_ids = packed_segment_ids(3, tk, n_docs, gen) if n_docs else None
    mask = fa.attention_mask(tq, tk, causal, window, segment_ids, "cpu")
    pairs = int(mask.sum()) if mask is not None else tq * tk
    rows = 3 if segment_ids is None else 1
    fwd, bwd = fa.attention_flops(3, 8, tq, tk, 64, causal, window, segment_ids)
    assert fwd == 4 * rows * 8 * pairs * 64 and bwd == 10 * rows * 8 * pairs * 64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the interpreter computes bf16 wrongly")
@pytest.mark.parametrize("case", [
    (2, 32, 8, 1000, 1000, 128, True, None, 0),
    (2, 8, 8, 513, 513, 64, False, None, 0),
    (2, 32, 8, 700, 700, 128, True, 256, 3),
    (1, 16, 2, 1, 700, 96, True, None, 0),
])
def test_triton_bf16_on_gpu(case):
    check_against_reference(fa.attention_triton, *case, dtype=torch.bfloat16, seed=29, device="cuda")
