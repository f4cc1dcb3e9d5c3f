"""Causal attention over packed documents on CPU: one autograd node per layer, torch's CPU flash kernel per document.

Rows of a packed batch hold several documents; a query sees the keys of its own document up to itself. Cutting
q, k, v with `split` per row and per document and calling SDPA on each piece (the earlier CPU path) makes the
backward pay for the gradient of every split, a cat per document and per row for each of dq, dk and dv, and the
joined output had to be rebuilt in the backward. Here one Function calls torch's fused CPU flash kernels
(`aten._scaled_dot_product_flash_attention_for_cpu` and its backward, the kernels SDPA itself runs, GQA included:
K/V are never repeated) on each document's views and writes the output and the gradients straight into
[B, T, H, D] buffers, the layout of the projections' outputs, so the views into and out of the attention cost
nothing. It keeps q, k, v, the output and the log-sum-exp [B, Hq, T]: never T x T probabilities.

Measured on this machine (B=4, T=512, Hq=9, Hkv=3, D=64, fp32): a blocked Python loop over query blocks with
batched matmuls (scores per block, softmax, P V, and the flash backward by hand) took 255-330 ms of CPU time for a
forward and backward at 1 thread against 181 ms for the per-document SDPA calls, so the per-document kernel stays.
"""
from __future__ import annotations

import torch

_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def document_spans(segment_ids: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """segment_ids [B, T] -> per row, the [start, end) runs of equal ids; None when an id comes back after another
    one (a document split in two runs, which spans cannot express)."""
    t = segment_ids.shape[1]
    starts = torch.ones_like(segment_ids, dtype=torch.bool)  # [B, T]
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    ordered = segment_ids.sort(dim=1).values
    distinct = torch.ones_like(starts)
    distinct[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    if not torch.equal(starts.sum(1), distinct.sum(1)):
        return None
    spans = []
    for row in starts.cpu().tolist():
        begin = [i for i, is_start in enumerate(row) if is_start]
        spans.append(list(zip(begin, begin[1:] + [t])))
    return spans


def _pieces(spans):
    """(row, start, end) of every document, as one-row index ranges."""
    return [(row, start, end) for row, row_spans in enumerate(spans) for start, end in row_spans]


class PackedCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spans, scale):
        """q [B, Hq, T, D], k/v [B, Hkv, T, D] -> [B, Hq, T, D] (a view of [B, T, Hq, D] memory)."""
        b, hq, t, d = q.shape
        out = torch.empty(b, t, hq, d, dtype=q.dtype, device=q.device).transpose(1, 2)  # [B, Hq, T, D] view
        lse = torch.empty(b, hq, t, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
        for row, s, e in _pieces(spans):
            r = slice(row, row + 1)
            piece, piece_lse = _forward(q[r, :, s:e], k[r, :, s:e], v[r, :, s:e], 0.0, True, scale=scale)
            out[r, :, s:e] = piece  # [1, Hq, n, D]
            lse[r, :, s:e] = piece_lse  # [1, Hq, n]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spans, ctx.scale = spans, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        b, hq, t, d = q.shape
        hkv = k.shape[1]
        dq = torch.empty(b, t, hq, d, dtype=q.dtype, device=q.device).transpose(1, 2)  # [B, Hq, T, D] views
        dk = torch.empty(b, t, hkv, d, dtype=k.dtype, device=k.device).transpose(1, 2)  # every position is in
        dv = torch.empty(b, t, hkv, d, dtype=v.dtype, device=v.device).transpose(1, 2)  # one document
        for row, s, e in _pieces(ctx.spans):
            r = slice(row, row + 1)
            grads = _backward(dout[r, :, s:e], q[r, :, s:e], k[r, :, s:e], v[r, :, s:e], out[r, :, s:e],
                              lse[r, :, s:e], 0.0, True, scale=ctx.scale)
            for full, piece in zip((dq, dk, dv), grads):
                full[r, :, s:e] = piece
        return dq, dk, dv, None, None


def packed_causal_attention(q, k, v, spans, scale=None):
    """q [B, Hq, T, D], k/v [B, Hkv, T, D] (Hq % Hkv == 0), spans from `document_spans` covering every position
    -> causal attention within each span, [B, Hq, T, D]."""
    return PackedCausalAttention.apply(q, k, v, spans, scale)
