"""Attention with causal, sliding-window and packed-document masks, GQA without repeating K/V.

Masking rules (every path in this file follows them):
- query row i of Tq sits at key position q_pos = i + Tk - Tq (bottom-right aligned, as with a KV cache);
- causal: a query sees keys with k_pos <= q_pos;
- sliding_window=W (Mistral): a query sees keys with q_pos - k_pos < W, i.e. itself and the W - 1 keys before it;
- segment_ids [B, Tk] (packed documents): a query sees only keys whose segment id equals its own; the queries take
  the ids of the last Tq key positions (segment_ids[:, Tk - Tq:]). Ids need not be sorted or contiguous, although
  contiguous runs (what packing produces) let both paths skip work across documents.
A query row that sees no key at all (only possible with causal and Tq > Tk) gets a zero output, as in torch's
scaled_dot_product_attention, and passes no gradient.

Three implementations:
- `attention_reference`: the masks spelled out, through `scaled_dot_product_attention` (the tests' oracle runs it
  in float64).
- `attention_triton`: FlashAttention-2 style Triton kernels (forward, dK/dV pass, dQ pass) in an autograd.Function.
- `attention_torch`: the CPU training path; see the comment above it for why it calls SDPA per document.
"""
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .cpu_attention import document_spans
from .rebuild import rebuild_in_backward


class AttentionInputError(ValueError):
    """Bad shapes or arguments passed to attention."""


def attention_mask(tq, tk, causal, sliding_window, segment_ids, device):
    """Boolean mask, True where a query may attend: [Tq, Tk] or [B, 1, Tq, Tk] with segment ids; None if all True."""
    if not causal and sliding_window is None and segment_ids is None:
        return None
    q_pos = torch.arange(tk - tq, tk, device=device)[:, None]  # [Tq, 1]
    k_pos = torch.arange(tk, device=device)[None, :]  # [1, Tk]
    mask = torch.ones(tq, tk, dtype=torch.bool, device=device)
    if causal:
        mask &= k_pos <= q_pos
    if sliding_window is not None:
        mask &= (q_pos - k_pos) < sliding_window
    if segment_ids is not None:
        mask = mask & (segment_ids[:, -tq:, None] == segment_ids[:, None, :])[:, None]  # [B, 1, Tq, Tk]
    return mask


def attention_reference(q, k, v, causal=True, sliding_window=None, segment_ids=None, scale=None):
    tq, tk = q.shape[-2], k.shape[-2]
    if causal and sliding_window is None and segment_ids is None and tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    mask = attention_mask(tq, tk, causal, sliding_window, segment_ids, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def check_attention_inputs(q, k, v, sliding_window, segment_ids):
    """Raise AttentionInputError with a one-line message for inputs no path can handle."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise AttentionInputError(f"attention: q, k, v must be [B, H, T, D], got {tuple(q.shape)}, "
                                  f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, hq, tq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise AttentionInputError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must be "
                                  f"[{b}, Hkv, Tk, {d}] to match q {tuple(q.shape)}")
    if hq % k.shape[1] != 0:
        raise AttentionInputError(f"attention: query heads {hq} are not a multiple of key/value heads {k.shape[1]}")
    if tq == 0 or k.shape[2] == 0:
        raise AttentionInputError(f"attention: empty sequence (Tq={tq}, Tk={k.shape[2]})")
    if sliding_window is not None and (isinstance(sliding_window, bool) or int(sliding_window) != sliding_window
                                       or sliding_window < 1):
        raise AttentionInputError(f"attention: sliding_window must be a positive int or None, got {sliding_window!r}")
    if segment_ids is not None and tuple(segment_ids.shape) != (b, k.shape[2]):
        raise AttentionInputError(f"attention: segment_ids must be [B, Tk] = [{b}, {k.shape[2]}], "
                                  f"got {tuple(segment_ids.shape)}")
    if segment_ids is not None and tq > k.shape[2]:
        raise AttentionInputError(f"attention: segment_ids need Tq <= Tk, got Tq={tq}, Tk={k.shape[2]}")


def _effective_window(sliding_window, tk):
    """None when the window cannot hide any key: q_pos - k_pos <= Tk - 1 < W."""
    if sliding_window is None or sliding_window >= tk:
        return None
    return int(sliding_window)


# ---------------------------------------------------------------------------------------------------------------
# CPU path.
#
# What torch 2.13's CPU `scaled_dot_product_attention` does (measured on this machine, B=4, Hq=9, Hkv=3, T=2048,
# D=64, fp32, 6 packed documents per row):
# - every variant below runs the fused CPU flash kernel (grad_fn ScaledDotProductFlashAttentionForCpuBackward0):
#   is_causal, a boolean mask, a float mask, and enable_gqa (K/V are not repeated: the gradient flows straight into
#   k and v). It saves q, k, v, out and the log-sum-exp, never the [T, T] probabilities. Only the math backend
#   (forced, or for unsupported inputs) keeps [B, H, T, T] probabilities and repeats K/V.
# - a mask is converted to a float [Tq, Tk] (or [B, 1, Tq, Tk]) tensor that is saved for the backward, and the
#   kernel then visits every block: boolean mask fwd 240 ms / bwd 502 ms, float mask 141 / 333 ms, against
#   is_causal 78 / 207 ms, which skips the blocks above the diagonal and keeps no mask.
# - one is_causal call per document: 42 / 208 ms, exact (max diff 5e-7 from the masked call), no mask of any size.
#   Inputs must stay 4-D ([1, H, t, D]): 3-D inputs silently take the math backend. The rows and documents are cut
#   with `split`, so the backward is one cat rather than a zero-filled scatter per slice. End to end, this function
#   against `attention_reference` (boolean mask) on that shape, machine busy: fwd 328 vs 767 ms, bwd 639 vs 1516 ms.
# So: packed rows go through one SDPA call per document, plain causal through is_causal, and only what is left
# (a window narrower than Tk, causal with Tq != Tk > 1, segment ids that are not contiguous runs) builds a mask.
# ---------------------------------------------------------------------------------------------------------------
def _sdpa_unsegmented(q, k, v, causal, window, scale):
    """q [..., Hq, Tq, D], k/v [..., Hkv, Tk, D]; window already dropped when it cannot bind."""
    tq, tk = q.shape[-2], k.shape[-2]
    if window is None and (not causal or tq == 1):
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
    if window is None and tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    mask = attention_mask(tq, tk, causal, window, None, q.device)  # [Tq, Tk]
    additive = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=scale, enable_gqa=True)


def _document_runs(segment_ids):
    """Per row, the lengths of its runs of equal ids, or None if some id appears in two separate runs."""
    spans = document_spans(segment_ids)
    return None if spans is None else [[end - start for start, end in row] for row in spans]


def attention_torch(q, k, v, causal=True, sliding_window=None, segment_ids=None, scale=None):
    """Same contract as `attention_triton`, through torch's fused SDPA kernels (see the comment above)."""
    check_attention_inputs(q, k, v, sliding_window, segment_ids)
    tq, tk = q.shape[-2], k.shape[-2]
    window = _effective_window(sliding_window, tk)
    runs = _document_runs(segment_ids) if segment_ids is not None else None
    if segment_ids is not None and runs is None:
        mask = attention_mask(tq, tk, causal, window, segment_ids, q.device)  # [B, 1, Tq, Tk]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    if runs is None:
        return _sdpa_unsegmented(q, k, v, causal, window, scale)
    first_query = tk - tq  # key position of query row 0
    pieces = []  # per document, SDPA's output seen as [1, t, Hq, D] (SDPA follows the layout of q, [B, T, H, D] here)
    # Rows stay 4-D ([1, H, T, D]): with 3-D inputs SDPA falls back to the math backend (T x T probabilities).
    for q_row, k_row, v_row, lengths in zip(q.split(1), k.split(1), v.split(1), runs):
        # A document [s, e) of keys owns the query rows at key positions [max(s, first_query), e).
        key_lengths, query_lengths, start = [], [], 0
        for length in lengths:
            end = start + length
            key_lengths.append(length)
            query_lengths.append(max(0, end - max(start, first_query)))
            start = end
        for q_doc, k_doc, v_doc in zip(q_row.split(query_lengths, dim=2), k_row.split(key_lengths, dim=2),
                                       v_row.split(key_lengths, dim=2)):
            if q_doc.shape[2] > 0:
                doc_window = _effective_window(window, k_doc.shape[2])
                out = _sdpa_unsegmented(q_doc, k_doc, v_doc, causal, doc_window, scale)  # [1, Hq, t, D]
                pieces.append(out.transpose(1, 2))  # [1, t, Hq, D]
    # [B, Tq, Hq, D], so the o_proj input is a view of it. SDPA keeps the pieces for its backward: whoever saves
    # this concatenation (o_proj) keeps the recipe instead (kernels/rebuild.py).
    joined = rebuild_in_backward(_join_pieces(pieces, q.shape[0], tq), _join_pieces, pieces, q.shape[0], tq)
    return joined.transpose(1, 2)  # [B, Hq, Tq, D]


def _join_pieces(pieces, b, tq):
    """Per-document [1, t, H, D] outputs, rows in order -> [B, Tq, H, D]."""
    return torch.cat(pieces, dim=1).view(b, tq, *pieces[0].shape[2:])


# ---------------------------------------------------------------------------------------------------------------
# Triton path, FlashAttention-2 style.
#
# Online softmax (forward), per query row i, in base 2 so the exponent is one exp2:
#   s_ij  = (q_i . k_j) * scale * log2(e)                       scores, -inf where masked
#   m_i'  = max(m_i, max_j s_ij)                                running max over the key blocks seen so far
#   p_ij  = 2^(s_ij - m_i'),   alpha = 2^(m_i - m_i')           alpha rescales what was summed under the old max
#   l_i'  = alpha l_i + sum_j p_ij,   acc_i' = alpha acc_i + sum_j p_ij v_j
# after the last block: o_i = acc_i / l_i and lse2_i = m_i + log2(l_i) (saved, fp32, [B, Hq, Tq]). While a row has
# seen only masked keys m_i = -inf; subtracting 0 instead keeps p = alpha = 0 (no inf - inf = NaN). A row that sees
# no key ends with l_i = 0: o_i = 0 and lse2_i = +inf, so the backward's p is 0 there.
#
# Backward, with p_ij = 2^(s_ij - lse2_i) recomputed from the saved lse2 (no [T, T] tensor is ever stored):
#   delta_i = do_i . o_i  (= sum_j p_ij dp_ij)            one small pre-pass
#   dv_j = sum_i p_ij do_i          dp_ij = do_i . v_j       ds_ij = p_ij (dp_ij - delta_i)
#   dk_j = scale sum_i ds_ij q_i    dq_i = scale sum_j ds_ij k_j
# Determinism without atomics: the dK/dV kernel owns a block of keys of one KV head and loops over the query heads
# of its group (GQA: dk/dv of a KV head sum over its Hq/Hkv query heads in a fixed order, K/V read once, never
# repeated), and a separate dQ kernel owns a block of queries and loops over key blocks. When B x Hkv x key blocks
# would leave most of the GPU idle, the group is split over several programs that write fp32 partial sums, added
# afterwards in a fixed order. Each output element has a fixed summation order, so two backward runs are bitwise
# equal.
#
# Which blocks a program visits (no `if` inside a loop, so Triton can software-pipeline every loop): a query block
# sees keys in [lo, hi), of which the blocks [full_lo, full_hi) need no mask at all. The positional rules (causal,
# window, ragged end) give these bounds in the kernel; packed documents add per-block bounds computed on the host
# from the segment ids (`_SegmentRanges`), intersected in the kernel. Each loop runs in three stages: [lo, a) masked,
# [a, c) unmasked, [c, hi) masked, and the id mask is applied in the masked stages only.
#
# Cost model (useful FLOPs, 2 per multiply-add, N = number of visible (query, key) pairs per head, see
# `attention_flops`): forward QK^T and PV: 4 N D. Backward: the five matmuls of the algorithm (QK^T recomputed,
# dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q): 10 N D, i.e. 2.5x the forward (FlashAttention's
# convention); the separate dQ pass recomputes QK^T and dO V^T, so the kernels execute 14 N D. Bytes (HBM):
# forward reads Q once and K, V once per query block (Tq / BLOCK_M times), writes O and lse; at T >= 512 and
# D = 128 this is ~100 FLOP/byte or more, compute bound on an H100.
# ---------------------------------------------------------------------------------------------------------------
LOG2E = 1.4426950408889634

# Set by tests: outputs and saved buffers are allocated NaN-filled, so an element a kernel forgets to write fails.
POISON_OUTPUTS = False
# Set by tests: the interpreter runs the GPU tile sizes (and GQA split) instead of its small tiles.
GPU_TILES_ON_CPU = False


def _new_output(shape_or_like, dtype=None, device=None):
    if isinstance(shape_or_like, torch.Tensor):
        out = torch.empty_like(shape_or_like)
    else:
        out = torch.empty(shape_or_like, dtype=dtype, device=device)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


@triton.jit
def _visible(q_pos, k_pos, tk, window, seg_q, seg_k,
             CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr):
    """True where the query at q_pos may see the key at k_pos: [rows, cols], or [1, cols] when only the key
    bound applies (it broadcasts)."""
    vis = k_pos[None, :] < tk
    if CAUSAL:
        vis = vis & (k_pos[None, :] <= q_pos[:, None])
    if HAS_WINDOW:
        vis = vis & (q_pos[:, None] - k_pos[None, :] < window)
    if HAS_SEGMENTS:
        vis = vis & (seg_q[:, None] == seg_k[None, :])
    return vis


@triton.jit
def _split_range(lo, full_lo, full_hi, hi, RANGES, index, HAS_SEGMENTS: tl.constexpr):
    """Intersect positional bounds with the host's per-block document bounds (RANGES[index] = lo, hi, full_lo,
    full_hi), then split into [lo, a) masked, [a, c) unmasked, [c, hi) masked."""
    if HAS_SEGMENTS:
        row = RANGES + index.to(tl.int64) * 4
        lo = tl.maximum(lo, tl.load(row))
        hi = tl.minimum(hi, tl.load(row + 1))
        full_lo = tl.maximum(full_lo, tl.load(row + 2))
        full_hi = tl.minimum(full_hi, tl.load(row + 3))
    a = tl.maximum(tl.minimum(full_lo, hi), lo)
    c = tl.maximum(tl.minimum(full_hi, hi), a)
    hi = tl.maximum(hi, c)
    return lo, a, c, hi


@triton.jit
def _kv_bounds(q_lo, q_hi, tk, window, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Positional key bounds (lo, full_lo, full_hi, hi) for the queries at key positions [q_lo, q_hi]."""
    lo = 0
    hi = tk
    full_lo = 0
    full_hi = (tk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(hi, q_hi + 1)
        full_hi = tl.minimum(full_hi, (tl.maximum(q_lo + 1, 0) // BLOCK_N) * BLOCK_N)
    if HAS_WINDOW:
        lo = (tl.maximum(q_lo - window + 1, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(q_hi - window + 1, 0), BLOCK_N) * BLOCK_N
    return lo, full_lo, full_hi, hi


@triton.jit
def _load_rows(HEAD, start, stride_t, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """Rows [start, start + BLOCK) of one head as [BLOCK, BLOCK_D]; zeros past n_rows and HEAD_DIM. The row offset
    is an int64 scalar, so a head longer than 2^31 elements stays addressable."""
    offs = tl.arange(0, BLOCK)
    mask = (start + offs[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    return tl.load(HEAD + start.to(tl.int64) * stride_t + offs[:, None] * stride_t + offs_d[None, :], mask=mask,
                   other=0.0)


@triton.jit
def _store_rows(HEAD, start, stride_t, n_rows, offs_d, values, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = (start + offs[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    tl.store(HEAD + start.to(tl.int64) * stride_t + offs[:, None] * stride_t + offs_d[None, :],
             values.to(HEAD.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_stage(acc, l_i, m_i, q, q_pos, seg_q, K_head, V_head, SEG_row, start, stop, stride_kt, stride_vt, tk,
               window, qk_scale, offs_d, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(start, stop, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = _load_rows(K_head, start_n, stride_kt, tk, offs_d, HEAD_DIM, BLOCK_N)  # [BN, BD]
        v = _load_rows(V_head, start_n, stride_vt, tk, offs_d, HEAD_DIM, BLOCK_N)  # [BN, BD]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BM, BN], log2 units
        if MASKED:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            seg_k = 0
            if HAS_SEGMENTS:
                seg_k = tl.load(SEG_row + offs_n, mask=offs_n < tk, other=-1)
            s = tl.where(_visible(q_pos, offs_n, tk, window, seg_q, seg_k, CAUSAL, HAS_WINDOW, HAS_SEGMENTS), s,
                         float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = m_new
        p = tl.exp2(s - m_sub[:, None])  # [BM, BN]
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _query_block(pid, n_qblocks, CAUSAL: tl.constexpr):
    """Causal: the last query blocks see the most keys, so they get the lowest program ids (they start first)."""
    if CAUSAL:
        pid = n_qblocks - 1 - pid
    return pid


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, SEG, RANGES,
                     stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                     stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                     n_heads, group, tq, tk, window, qk_scale, n_qblocks,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
                     PRECISION: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_m = _query_block(tl.program_id(1), n_qblocks, CAUSAL)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    kv_h = h // group
    first_query = tk - tq
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_pos = offs_m + first_query
    Q_head = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    K_head = K + b.to(tl.int64) * stride_kb + kv_h.to(tl.int64) * stride_kh
    V_head = V + b.to(tl.int64) * stride_vb + kv_h.to(tl.int64) * stride_vh
    q = _load_rows(Q_head, m0, stride_qt, tq, offs_d, HEAD_DIM, BLOCK_M)  # [BM, BD]

    SEG_row = SEG + b.to(tl.int64) * tk
    seg_q = 0
    if HAS_SEGMENTS:
        seg_q = tl.load(SEG_row + q_pos, mask=offs_m < tq, other=-2)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    q_hi = tl.minimum(m0 + BLOCK_M, tq) - 1 + first_query
    lo, full_lo, full_hi, hi = _kv_bounds(m0 + first_query, q_hi, tk, window, BLOCK_N, CAUSAL, HAS_WINDOW)
    lo, a, c, hi = _split_range(lo, full_lo, full_hi, hi, RANGES, b * n_qblocks + pid_m, HAS_SEGMENTS)
    acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, q, q_pos, seg_q, K_head, V_head, SEG_row, lo, a, stride_kt, stride_vt,
                               tk, window, qk_scale, offs_d, HEAD_DIM, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_SEGMENTS,
                               True, PRECISION)
    acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, q, q_pos, seg_q, K_head, V_head, SEG_row, a, c, stride_kt, stride_vt,
                               tk, window, qk_scale, offs_d, HEAD_DIM, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_SEGMENTS,
                               False, PRECISION)
    acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, q, q_pos, seg_q, K_head, V_head, SEG_row, c, hi, stride_kt, stride_vt,
                               tk, window, qk_scale, offs_d, HEAD_DIM, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_SEGMENTS,
                               True, PRECISION)

    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    _store_rows(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh, m0, stride_ot, tq, offs_d, o,
                HEAD_DIM, BLOCK_M)
    tl.store(LSE + pid_bh.to(tl.int64) * tq + offs_m, lse, mask=offs_m < tq)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
                      n_heads, tq, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta_i = do_i . o_i in fp32, [B, Hq, Tq]."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh, m0, stride_ot, tq, offs_d,
                   HEAD_DIM, BLOCK_M).to(tl.float32)
    do = _load_rows(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh, m0, stride_dot, tq, offs_d,
                    HEAD_DIM, BLOCK_M).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * tq + offs_m, tl.sum(o * do, 1), mask=offs_m < tq)


@triton.jit
def _dkdv_stage(dk, dv, k, v, k_pos, seg_k, Q_head, DO_head, LSE_head, DELTA_head, SEG_row, start, stop,
                stride_qt, stride_dot, tq, tk, window, qk_scale, offs_d,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                HAS_SEGMENTS: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate one query head's contribution to a key block's dk, dv over query rows [start, stop)."""
    for start_m in range(start, stop, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < tq
        q = _load_rows(Q_head, start_m, stride_qt, tq, offs_d, HEAD_DIM, BLOCK_M)  # [BM, BD]
        do = _load_rows(DO_head, start_m, stride_dot, tq, offs_d, HEAD_DIM, BLOCK_M)  # [BM, BD]
        # Rows past Tq load lse = +inf, so their p (and ds) is 0: the unmasked stage needs no row mask.
        lse = tl.load(LSE_head + offs_m, mask=row_ok, other=float("inf"))  # [BM]
        delta = tl.load(DELTA_head + offs_m, mask=row_ok, other=0.0)  # [BM]
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [BN, BM]
        p_t = tl.exp2(s_t - lse[None, :])
        if MASKED:
            q_pos = offs_m + (tk - tq)
            seg_q = 0
            if HAS_SEGMENTS:
                seg_q = tl.load(SEG_row + q_pos, mask=row_ok, other=-2)
            vis = _visible(q_pos, k_pos, tk, window, seg_q, seg_k, CAUSAL, HAS_WINDOW, HAS_SEGMENTS)
            p_t = tl.where(tl.trans(vis), p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BN, BM]
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, SEG, RANGES,
                          stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                          stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                          stride_dks, stride_dkb, stride_dkh, stride_dkt, stride_dvs, stride_dvb, stride_dvh,
                          stride_dvt, n_heads, n_kv_heads, group, n_splits, tq, tk, window, qk_scale, sm_scale,
                          n_kblocks,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                          HAS_SEGMENTS: tl.constexpr, PRECISION: tl.constexpr):
    """One key block of one KV head; query heads [split * group / n_splits, ...) of its group. Program axis 1 is
    the key block: with causal masks the first key blocks are seen by the most queries and start first."""
    pid_bhs = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = pid_bhs % n_splits
    pid_bh = pid_bhs // n_splits
    b = pid_bh // n_kv_heads
    kv_h = pid_bh % n_kv_heads
    first_query = tk - tq
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + b.to(tl.int64) * stride_kb + kv_h.to(tl.int64) * stride_kh, n0, stride_kt, tk, offs_d,
                   HEAD_DIM, BLOCK_N)  # [BN, BD]
    v = _load_rows(V + b.to(tl.int64) * stride_vb + kv_h.to(tl.int64) * stride_vh, n0, stride_vt, tk, offs_d,
                   HEAD_DIM, BLOCK_N)  # [BN, BD]
    SEG_row = SEG + b.to(tl.int64) * tk
    seg_k = 0
    if HAS_SEGMENTS:
        seg_k = tl.load(SEG_row + offs_n, mask=offs_n < tk, other=-1)

    # Query rows (indices into Tq) that can see a key of this block: [lo, hi), whole for rows in [full_lo, full_hi).
    # Keys past Tk are never stored, so only real keys [n0, n_end) bound the ranges.
    n_end = tl.minimum(n0 + BLOCK_N, tk)
    lo = 0
    hi = tq
    full_lo = 0
    full_hi = tq
    if CAUSAL:
        lo = (tl.maximum(n0 - first_query, 0) // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(n_end - 1 - first_query, 0), BLOCK_M) * BLOCK_M
    if HAS_WINDOW:
        hi = tl.minimum(hi, tl.maximum(n_end - 1 + window - first_query, 0))
        full_hi = (tl.maximum(n0 + window - first_query, 0) // BLOCK_M) * BLOCK_M
    lo, a, c, hi = _split_range(lo, full_lo, full_hi, hi, RANGES, b * n_kblocks + pid_n, HAS_SEGMENTS)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    heads_per_split = group // n_splits
    for g in range(0, heads_per_split):
        h = kv_h * group + split * heads_per_split + g
        bh = b * n_heads + h
        Q_head = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        DO_head = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        LSE_head = LSE + bh.to(tl.int64) * tq
        DELTA_head = DELTA + bh.to(tl.int64) * tq
        dk, dv = _dkdv_stage(dk, dv, k, v, offs_n, seg_k, Q_head, DO_head, LSE_head, DELTA_head, SEG_row, lo, a,
                             stride_qt, stride_dot, tq, tk, window, qk_scale, offs_d, HEAD_DIM, BLOCK_M, CAUSAL,
                             HAS_WINDOW, HAS_SEGMENTS, True, PRECISION)
        dk, dv = _dkdv_stage(dk, dv, k, v, offs_n, seg_k, Q_head, DO_head, LSE_head, DELTA_head, SEG_row, a, c,
                             stride_qt, stride_dot, tq, tk, window, qk_scale, offs_d, HEAD_DIM, BLOCK_M, CAUSAL,
                             HAS_WINDOW, HAS_SEGMENTS, False, PRECISION)
        dk, dv = _dkdv_stage(dk, dv, k, v, offs_n, seg_k, Q_head, DO_head, LSE_head, DELTA_head, SEG_row, c, hi,
                             stride_qt, stride_dot, tq, tk, window, qk_scale, offs_d, HEAD_DIM, BLOCK_M, CAUSAL,
                             HAS_WINDOW, HAS_SEGMENTS, True, PRECISION)
    DK_head = DK + split.to(tl.int64) * stride_dks + b.to(tl.int64) * stride_dkb + kv_h.to(tl.int64) * stride_dkh
    DV_head = DV + split.to(tl.int64) * stride_dvs + b.to(tl.int64) * stride_dvb + kv_h.to(tl.int64) * stride_dvh
    _store_rows(DK_head, n0, stride_dkt, tk, offs_d, dk * sm_scale, HEAD_DIM, BLOCK_N)
    _store_rows(DV_head, n0, stride_dvt, tk, offs_d, dv, HEAD_DIM, BLOCK_N)


@triton.jit
def _dq_stage(dq, q, do, lse, delta, q_pos, seg_q, K_head, V_head, SEG_row, start, stop, stride_kt, stride_vt, tk,
              window, qk_scale, offs_d, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(start, stop, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = _load_rows(K_head, start_n, stride_kt, tk, offs_d, HEAD_DIM, BLOCK_N)  # [BN, BD]
        v = _load_rows(V_head, start_n, stride_vt, tk, offs_d, HEAD_DIM, BLOCK_N)  # [BN, BD]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BM, BN]
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            seg_k = 0
            if HAS_SEGMENTS:
                seg_k = tl.load(SEG_row + offs_n, mask=offs_n < tk, other=-1)
            p = tl.where(_visible(q_pos, offs_n, tk, window, seg_q, seg_k, CAUSAL, HAS_WINDOW, HAS_SEGMENTS), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BM, BN]
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, SEG, RANGES,
                        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                        stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                        stride_dqb, stride_dqh, stride_dqt,
                        n_heads, group, tq, tk, window, qk_scale, sm_scale, n_qblocks,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
                        PRECISION: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_m = _query_block(tl.program_id(1), n_qblocks, CAUSAL)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    kv_h = h // group
    first_query = tk - tq
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_pos = offs_m + first_query
    row_ok = offs_m < tq
    q = _load_rows(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, m0, stride_qt, tq, offs_d,
                   HEAD_DIM, BLOCK_M)  # [BM, BD]
    do = _load_rows(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh, m0, stride_dot, tq, offs_d,
                    HEAD_DIM, BLOCK_M)  # [BM, BD]
    lse = tl.load(LSE + pid_bh.to(tl.int64) * tq + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * tq + offs_m, mask=row_ok, other=0.0)
    K_head = K + b.to(tl.int64) * stride_kb + kv_h.to(tl.int64) * stride_kh
    V_head = V + b.to(tl.int64) * stride_vb + kv_h.to(tl.int64) * stride_vh
    SEG_row = SEG + b.to(tl.int64) * tk
    seg_q = 0
    if HAS_SEGMENTS:
        seg_q = tl.load(SEG_row + q_pos, mask=row_ok, other=-2)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    q_hi = tl.minimum(m0 + BLOCK_M, tq) - 1 + first_query
    lo, full_lo, full_hi, hi = _kv_bounds(m0 + first_query, q_hi, tk, window, BLOCK_N, CAUSAL, HAS_WINDOW)
    lo, a, c, hi = _split_range(lo, full_lo, full_hi, hi, RANGES, b * n_qblocks + pid_m, HAS_SEGMENTS)
    dq = _dq_stage(dq, q, do, lse, delta, q_pos, seg_q, K_head, V_head, SEG_row, lo, a, stride_kt, stride_vt, tk,
                   window, qk_scale, offs_d, HEAD_DIM, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_SEGMENTS, True, PRECISION)
    dq = _dq_stage(dq, q, do, lse, delta, q_pos, seg_q, K_head, V_head, SEG_row, a, c, stride_kt, stride_vt, tk,
                   window, qk_scale, offs_d, HEAD_DIM, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_SEGMENTS, False, PRECISION)
    dq = _dq_stage(dq, q, do, lse, delta, q_pos, seg_q, K_head, V_head, SEG_row, c, hi, stride_kt, stride_vt, tk,
                   window, qk_scale, offs_d, HEAD_DIM, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_SEGMENTS, True, PRECISION)
    _store_rows(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh, m0, stride_dqt, tq, offs_d,
                dq * sm_scale, HEAD_DIM, BLOCK_M)


# Tile shapes (BLOCK_M query rows x BLOCK_N key rows, num_warps, num_stages) per padded head dim, for an H100 with
# bf16 inputs (FlashAttention-2 / Triton-tutorial territory: 128-row query tiles in the forward; in dK/dV the two
# fp32 [BLOCK_N, D] accumulators are the register budget). Each entry is checked by benchmarks/compile_check.py:
# no register spill and shared memory under the sm_90 limit, with the JIT's own specialisation.
# Head dims 16 and 96 run padded (tl.arange needs powers of two >= 16); masked loads keep the padding at zero.
# Under the interpreter small tiles make short test sequences span several blocks, so the block-skipping and
# ragged-edge logic is exercised; tests also run the GPU tiles there (GPU_TILES_ON_CPU).
_GPU_CONFIGS = {  # block_d: {kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages)}
    # dK/dV: 16 query rows x 128 keys, 8 warps, 2 stages is the tile that compiles without a register spill at every
    # head dim with Triton 3.6 and 3.9 (32 x 128 / 64 x 64 / 64 x 128 spill 24-3000 B per thread in one or both).
    16: {"fwd": (128, 64, 4, 3), "dkdv": (16, 128, 8, 2), "dq": (128, 64, 4, 3)},
    32: {"fwd": (128, 64, 4, 3), "dkdv": (16, 128, 8, 2), "dq": (128, 64, 4, 3)},
    64: {"fwd": (128, 64, 4, 3), "dkdv": (16, 128, 8, 2), "dq": (128, 64, 8, 3)},
    # The sliding-window forward (its masks keep the window bound live too) at 3 stages reaches 255 registers with
    # Triton 3.9 and spills 16 B at head dim 128; at 2 stages the same tile uses 222-236 (head dims 96/128, Triton
    # 3.6 and 3.9), no spill.
    128: {"fwd": (128, 64, 8, 3), "fwd_window": (128, 64, 8, 2), "dkdv": (16, 128, 8, 2), "dq": (128, 32, 8, 3)},
    256: {"fwd": (64, 32, 8, 2), "dkdv": (16, 64, 8, 2), "dq": (64, 32, 8, 2)},
}
_INTERPRETER_CONFIG = {"fwd": (16, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}
# The dK/dV grid splits a GQA group over programs until about this many programs run (2 per SM of an H100).
_TARGET_PROGRAMS = 264


def _block_d(head_dim):
    return max(16, triton.next_power_of_2(head_dim))


def _config(kernel, head_dim, gpu, dtype=torch.bfloat16, window=False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages); window: a "<kernel>_window" entry, where the table has one."""
    if not gpu:
        return _INTERPRETER_CONFIG[kernel]
    configs = _GPU_CONFIGS[_block_d(head_dim)]
    block_m, block_n, warps, stages = configs.get(f"{kernel}_window", configs[kernel]) if window else configs[kernel]
    if dtype == torch.float32:  # 4-byte tiles: fewer pipeline stages fit in the 227 KB of shared memory
        stages = min(stages, 2)
    return block_m, block_n, warps, stages


def _dot_precision(dtype, gpu):
    # fp32 inputs: tf32 tensor-core dots on a GPU (IEEE fp32 dots there run on CUDA cores and spill registers);
    # IEEE in the interpreter, where the tests compare fp32 tightly.
    return "ieee" if dtype == torch.float32 and not gpu else "tf32"


def _dkdv_splits(group, programs):
    """How many programs share one KV head's query-head group: the largest divisor of `group` that keeps the
    program count near _TARGET_PROGRAMS."""
    wanted = max(1, -(-_TARGET_PROGRAMS // max(programs, 1)))
    return max(d for d in range(1, group + 1) if group % d == 0 and d <= wanted)


def _block_reduce(x, block, reduce):
    """x [B, L] -> [B, ceil(L / block)] per-block reduction; the ragged end repeats the last value."""
    length = x.shape[1]
    n_blocks = triton.cdiv(length, block)
    pad = n_blocks * block - length
    padded = torch.cat([x, x[:, -1:].expand(-1, pad)], dim=1) if pad else x
    return reduce(padded.reshape(x.shape[0], n_blocks, block), -1)


class _SegmentRanges:
    """Segment ids [B, Tk] as int32 plus, per block, the range of keys (for query blocks) or query rows (for key
    blocks) that can share an id, and the sub-range that certainly does (no mask needed). No host sync.

    Per key position t: run_start/run_end bound the run of equal ids around t; first/last bound every occurrence
    of t's id in the row (equal to the run for packed rows; wider when an id appears in several runs).
    """

    def __init__(self, segment_ids, tq, tk, device):
        self.tq, self.tk = tq, tk
        self.dummy = torch.zeros(4, dtype=torch.int32, device=device)
        self.ids = None
        if segment_ids is None:
            return
        ids = segment_ids.to(device=device, dtype=torch.int32).contiguous()  # [B, Tk]
        pos = torch.arange(tk, device=device, dtype=torch.int32).expand_as(ids)
        starts = torch.ones_like(ids, dtype=torch.bool)
        starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
        ends = torch.ones_like(starts)
        ends[:, :-1] = starts[:, 1:]
        self.run_start = torch.where(starts, pos, 0).cummax(1).values
        self.run_end = torch.where(ends, pos + 1, tk).flip(1).cummin(1).values.flip(1)
        ordered, order = ids.sort(dim=1, stable=True)
        group_start = torch.ones_like(starts)
        group_start[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        group_end = torch.ones_like(starts)
        group_end[:, :-1] = group_start[:, 1:]
        first_sorted = order.gather(1, torch.where(group_start, pos, 0).cummax(1).values.long())
        last_sorted = order.gather(1, torch.where(group_end, pos, tk - 1).flip(1).cummin(1).values.flip(1).long())
        self.first = torch.empty_like(ids).scatter_(1, order, first_sorted.int())
        self.end = torch.empty_like(ids).scatter_(1, order, last_sorted.int() + 1)
        self.ids = ids

    def key_ranges(self, block_q, block_k):
        """[B, n_qblocks, 4] int32: per query block (queries are the last Tq key positions) lo, hi, full_lo,
        full_hi in key positions; lo rounded down and full bounds rounded inwards to block_k."""
        if self.ids is None:
            return self.dummy
        fq = self.tk - self.tq
        lo = _block_reduce(self.first[:, fq:], block_q, torch.amin)
        hi = _block_reduce(self.end[:, fq:], block_q, torch.amax)
        run_lo = _block_reduce(self.run_start[:, fq:], block_q, torch.amin)
        run_hi = _block_reduce(self.run_start[:, fq:], block_q, torch.amax)
        single = run_lo == run_hi  # every query of the block in one run
        run_end = _block_reduce(self.run_end[:, fq:], block_q, torch.amin)
        full_lo = torch.where(single, (run_lo + block_k - 1) // block_k * block_k, self.tk)
        full_hi = torch.where(single, run_end // block_k * block_k, 0)
        return torch.stack([lo // block_k * block_k, hi, full_lo, full_hi], -1).int().contiguous()

    def query_ranges(self, block_q, block_k):
        """[B, n_kblocks, 4] int32: per key block lo, hi, full_lo, full_hi in query rows (0..Tq); lo rounded down
        and full bounds rounded inwards to block_q, except a full range that reaches Tk, which ends at Tq."""
        if self.ids is None:
            return self.dummy
        fq = self.tk - self.tq
        lo = (_block_reduce(self.first, block_k, torch.amin) - fq).clamp(0, self.tq)
        hi = (_block_reduce(self.end, block_k, torch.amax) - fq).clamp(0, self.tq)
        run_lo = _block_reduce(self.run_start, block_k, torch.amin)
        single = run_lo == _block_reduce(self.run_start, block_k, torch.amax)
        run_end = _block_reduce(self.run_end, block_k, torch.amin)
        rows_lo = (run_lo - fq).clamp(0, self.tq)
        rows_hi = (run_end - fq).clamp(0, self.tq)
        full_lo = torch.where(single, (rows_lo + block_q - 1) // block_q * block_q, self.tq)
        full_hi = torch.where(single, torch.where(run_end == self.tk, self.tq, rows_hi // block_q * block_q), 0)
        return torch.stack([lo // block_q * block_q, hi, full_lo, full_hi], -1).int().contiguous()

    @property
    def seg(self):
        return self.ids if self.ids is not None else self.dummy


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def forward_launch(q, k, v, o, lse, segments, causal, window, scale, gpu):
    """(kernel, grid, args, options) of the forward kernel; the compile check builds the same launches."""
    batch, n_heads, tq, head_dim = q.shape
    n_kv_heads, tk = k.shape[1], k.shape[2]
    block_m, block_n, warps, stages = _config("fwd", head_dim, gpu, q.dtype, window=window is not None)
    n_qblocks = triton.cdiv(tq, block_m)
    args = (q, k, v, o, lse, segments.seg, segments.key_ranges(block_m, block_n), *_strides(q), *_strides(k),
            *_strides(v), *_strides(o), n_heads, n_heads // n_kv_heads, tq, tk, window or 0, scale * LOG2E,
            n_qblocks)
    options = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(head_dim), CAUSAL=causal,
                   HAS_WINDOW=window is not None, HAS_SEGMENTS=segments.ids is not None,
                   PRECISION=_dot_precision(q.dtype, gpu), num_warps=warps, num_stages=stages)
    return _attn_fwd_kernel, (batch * n_heads, n_qblocks), args, options


def backward_launches(q, k, v, o, lse, do, delta, dq, dk, dv, segments, causal, window, scale, gpu):
    """[(kernel, grid, args, options)] of the delta, dK/dV and dQ kernels, in launch order. dk/dv are [splits, B,
    Hkv, Tk, D]-shaped (splits >= 1: partial sums over query heads, added by the caller)."""
    batch, n_heads, tq, head_dim = q.shape
    n_kv_heads, tk = k.shape[1], k.shape[2]
    block_d = _block_d(head_dim)
    flags = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, CAUSAL=causal, HAS_WINDOW=window is not None,
                 HAS_SEGMENTS=segments.ids is not None, PRECISION=_dot_precision(q.dtype, gpu))
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    delta_block = 64
    launches = [(_bwd_delta_kernel, (triton.cdiv(tq, delta_block), batch * n_heads),
                 (o, do, delta, *_strides(o), *_strides(do), n_heads, tq),
                 dict(HEAD_DIM=head_dim, BLOCK_M=delta_block, BLOCK_D=block_d))]

    block_m, block_n, warps, stages = _config("dkdv", head_dim, gpu, q.dtype)
    n_kblocks = triton.cdiv(tk, block_n)
    splits = dk.shape[0]
    launches.append((_attn_bwd_dkdv_kernel, (batch * n_kv_heads * splits, n_kblocks),
                     (q, k, v, do, lse, delta, dk, dv, segments.seg, segments.query_ranges(block_m, block_n),
                      *common, *dk.stride()[:4], *dv.stride()[:4], n_heads, n_kv_heads, n_heads // n_kv_heads,
                      splits, tq, tk, window or 0, scale * LOG2E, scale, n_kblocks),
                     dict(flags, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)))

    block_m, block_n, warps, stages = _config("dq", head_dim, gpu, q.dtype)
    n_qblocks = triton.cdiv(tq, block_m)
    launches.append((_attn_bwd_dq_kernel, (batch * n_heads, n_qblocks),
                     (q, k, v, do, lse, delta, dq, segments.seg, segments.key_ranges(block_m, block_n), *common,
                      *_strides(dq), n_heads, n_heads // n_kv_heads, tq, tk, window or 0, scale * LOG2E, scale,
                      n_qblocks),
                     dict(flags, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)))
    return launches


def dkdv_outputs(k, n_heads, gpu):
    """dk, dv as [splits, B, Hkv, Tk, D] views: k's layout and dtype when splits == 1, else fp32 partial sums."""
    batch, n_kv_heads, tk, head_dim = k.shape
    block_n = _config("dkdv", head_dim, gpu, k.dtype)[1]
    splits = _dkdv_splits(n_heads // n_kv_heads, batch * n_kv_heads * triton.cdiv(tk, block_n)) if gpu else 1
    if splits == 1:
        return _new_output(k)[None], _new_output(k)[None]
    shape = (splits, batch, tk, n_kv_heads, head_dim)  # the model's [B, T, H, D] layout, per split
    return (_new_output(shape, torch.float32, k.device).transpose(2, 3),
            _new_output(shape, torch.float32, k.device).transpose(2, 3))


def _uses_gpu_tiles(t):
    return t.is_cuda or GPU_TILES_ON_CPU


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, segment_ids, causal, window, scale):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        batch, n_heads, tq, _ = q.shape
        segments = _SegmentRanges(segment_ids, tq, k.shape[2], q.device)
        o = _new_output(q)  # same layout as q: a [B, T, H, D]-strided q gives a [B, T, H, D]-strided o
        lse = _new_output((batch, n_heads, tq), torch.float32, q.device)  # log2-sum-exp2 of the scaled scores
        kernel, grid, args, options = forward_launch(q, k, v, o, lse, segments, causal, window, scale,
                                                     _uses_gpu_tiles(q))
        kernel[grid](*args, **options)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.segments, ctx.causal, ctx.window, ctx.scale = segments, causal, window, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        do = _last_dim_contiguous(do)
        gpu = _uses_gpu_tiles(q)
        delta = _new_output(q.shape[:3], torch.float32, q.device)
        dq = _new_output(q)
        dk, dv = dkdv_outputs(k, q.shape[1], gpu)
        for kernel, grid, args, options in backward_launches(q, k, v, o, lse, do, delta, dq, dk, dv, ctx.segments,
                                                             ctx.causal, ctx.window, ctx.scale, gpu):
            kernel[grid](*args, **options)
        if dk.shape[0] > 1:  # partial sums over query heads, added in a fixed order
            dk, dv = dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)
        else:
            dk, dv = dk[0], dv[0]
        return dq, dk, dv, None, None, None, None


def attention_triton(q, k, v, causal=True, sliding_window=None, segment_ids=None, scale=None):
    """Fused attention: q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] (Hq % Hkv == 0) -> [B, Hq, Tq, D].

    Masks as in the module docstring: bottom-right causal, `sliding_window` W (q_pos - k_pos < W), `segment_ids`
    [B, Tk] for packed documents (a query sees only keys of its own segment). `scale` defaults to 1/sqrt(D).
    Differentiable in q, k, v; the backward is deterministic.
    """
    check_attention_inputs(q, k, v, sliding_window, segment_ids)
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise AttentionInputError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.shape[-1] > 256:
        raise AttentionInputError(f"attention: head dim {q.shape[-1]} > 256 is not supported by the Triton kernel")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    window = _effective_window(sliding_window, k.shape[2])
    return FlashAttentionFunction.apply(q, k, v, segment_ids, bool(causal), window, scale)


def visible_pairs(tq, tk, causal=True, sliding_window=None, segment_ids=None):
    """Number of (query, key) pairs the masks let through, per head, summed over the batch (1 row if no ids)."""
    if segment_ids is None:
        q_pos = torch.arange(tk - tq, tk, dtype=torch.float64)  # [Tq]
        hi = torch.minimum(q_pos, torch.tensor(tk - 1.0)) if causal else torch.full_like(q_pos, tk - 1.0)
        lo = (q_pos - sliding_window + 1).clamp(min=0) if sliding_window is not None else torch.zeros_like(q_pos)
        return int((hi - lo + 1).clamp(min=0).sum().item())
    k_pos = torch.arange(tk)[None, :]  # [1, Tk]
    seg = segment_ids.cpu()
    total = 0
    for start in range(0, tq, 1024):  # chunks of query rows bound the mask's memory
        rows = torch.arange(start, min(start + 1024, tq))
        q_pos = (rows + tk - tq)[:, None]  # [rows, 1]
        mask = seg[:, q_pos] == seg[:, None, :]  # [B, rows, Tk]
        if causal:
            mask &= k_pos <= q_pos
        if sliding_window is not None:
            mask &= q_pos - k_pos < sliding_window
        total += int(mask.sum().item())
    return total


def attention_flops(batch, n_heads, tq, tk, head_dim, causal=True, sliding_window=None, segment_ids=None):
    """(forward, backward) useful FLOPs: 4 N D and 10 N D per head, N = visible pairs (see the cost model above).

    With segment_ids the pair count already sums over the batch, so `batch` multiplies only without them.
    """
    pairs = visible_pairs(tq, tk, causal, sliding_window, segment_ids)
    rows = 1 if segment_ids is not None else batch
    return 4 * rows * n_heads * pairs * head_dim, 10 * rows * n_heads * pairs * head_dim
