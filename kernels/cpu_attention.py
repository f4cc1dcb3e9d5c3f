"""Causal attention over packed documents on CPU: one autograd node per layer, torch's CPU flash kernel per document.

Rows of a packed batch hold several documents; a query sees the keys of its own document up to itself. Cutting
q, k, v with `split` per row and per document and calling SDPA on each piece (the earlier CPU path) makes the
backward pay for the gradient of every split, a cat per document and per row for each of dq, dk and dv, and the
joined output had to be rebuilt in the backward. Here one Function calls torch's fused CPU flash kernels
(`aten._scaled_dot_product_flash_attention_for_cpu` and its backward, the kernels SDPA itself runs, GQA included:
K/V are never repeated) on each document's views and writes the output and the gradients straight into
[B, T, H, D] buffers, the layout of the projections' outputs, so the views into and out of the attention cost
nothing. It keeps q, k, v, the output and the log-sum-exp [B, Hq, T]: never T x T probabilities.

Measured on this machine (Hq=9, Hkv=3, D=64, fp32, 2 threads, one document): a blocked forward in torch ops
(scores per block of queries, max, exp2, sum, P V) takes 7.0 ms for 512 tokens against 5.5 for torch's kernel,
so the forward stays torch's. The backward is another matter: torch's CPU kernel spends 15.7 ms on a 512-token
document where `_blocked_document_backward` (the probabilities rebuilt from the saved log-sum-exp in blocks of
QUERY_BLOCK queries against the keys up to the block's end, the heads that share a K/V head stacked into one
matmul) takes 10.9; 8.2 against 6.0 at 384 tokens, 4.0 against 3.3 at 256, even at 128 (1.2 ms). So documents of
more than BLOCKED_BACKWARD_MIN_LEN tokens (fp32) take the blocked backward. Blocks of 64 queries beat 128 (13.5
ms at 512 tokens: the block's probabilities outgrow the 512 KB L2). Documents run in parallel, each on one
single-threaded worker (`parallel_units`), in the forward and in the backward.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

QUERY_BLOCK = 64
BLOCKED_BACKWARD_MIN_LEN = 128
LOG2_E = 1.4426950408889634


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


_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, the pool)


def _single_threaded_workers(workers: int) -> ThreadPoolExecutor:
    """`workers` Python threads whose torch ops each run on one intra-op thread (made once per process).

    torch.set_num_threads is per thread for OpenMP and MKL, but it also stores the count new threads start from,
    so the caller's count is set back once every worker has set its own."""
    global _pool
    if _pool is None or _pool[:2] != (os.getpid(), workers):  # a forked child has none of its parent's threads
        caller_threads = torch.get_num_threads()
        started = threading.Barrier(workers)
        pool = ThreadPoolExecutor(workers, thread_name_prefix="hippo-attention")
        # get_num_threads first: a thread's first call sets its count from the stored one, which would undo ours
        list(pool.map(lambda _: (torch.get_num_threads(), torch.set_num_threads(1), started.wait()), range(workers)))
        torch.set_num_threads(caller_threads)
        _pool = (os.getpid(), workers, pool)
    return _pool[2]


def parallel_units(fn, pieces, kv_heads: int, device) -> None:
    """Run fn((row, start, end, first K/V head, end K/V head)) over every document, in parallel over documents.

    Torch's intra-op threads split each small op of the blocked backward (a 64-query block's matmuls and
    exponentials) between the cores and wait for one another after each: on 2 cores that gains 1.3x over one
    thread, where a document per single-threaded worker gains 1.8x (4 x 512-token documents: 34 ms instead of 42).
    Torch's forward kernel gains less (a layer of 4 rows of 1-3 documents: 14.7 ms instead of 16.0). The longest
    documents go first (a worker takes the next one when it is free), and a document with more than a worker's
    share of the work is cut into its K/V heads, which are independent. Units write disjoint slices."""
    workers = torch.get_num_threads()
    if workers == 1 or device.type != "cpu" or len(pieces) == 0:
        for row, s, e in pieces:
            fn((row, s, e, 0, kv_heads))
        return
    total = sum((e - s) ** 2 for _, s, e in pieces)
    units = []
    for row, s, e in sorted(pieces, key=lambda piece: piece[1] - piece[2]):  # longest first
        split = (e - s) ** 2 * workers > total
        units += [(row, s, e, h, h + 1) for h in range(kv_heads)] if split else [(row, s, e, 0, kv_heads)]
    # Grad and inference mode are thread-local: the workers take the caller's.
    grad_mode, inference_mode = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run(unit):
        with torch.inference_mode(inference_mode), torch.set_grad_enabled(grad_mode):
            fn(unit)
    list(_single_threaded_workers(workers).map(run, units))  # re-raises a unit's exception here


class PackedCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spans, scale):
        """q [B, Hq, T, D], k/v [B, Hkv, T, D] -> [B, Hq, T, D] (a view of [B, T, Hq, D] memory)."""
        b, hq, t, d = q.shape
        out = torch.empty(b, t, hq, d, dtype=q.dtype, device=q.device).transpose(1, 2)  # [B, Hq, T, D] view
        lse = torch.empty(b, hq, t, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
        g = hq // k.shape[1]

        def document_forward(unit):  # one document's K/V heads [h0, h1): writes its slices of out and lse
            row, s, e, h0, h1 = unit
            r, heads, kv_heads = slice(row, row + 1), slice(h0 * g, h1 * g), slice(h0, h1)
            piece, piece_lse = _forward(q[r, heads, s:e], k[r, kv_heads, s:e], v[r, kv_heads, s:e], 0.0, True,
                                        scale=scale)
            out[r, heads, s:e] = piece  # [1, H, n, D]
            lse[r, heads, s:e] = piece_lse  # [1, H, n]

        parallel_units(document_forward, _pieces(spans), k.shape[1], q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spans, ctx.scale = spans, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        b, hq, t, d = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        dq = torch.empty(b, t, hq, d, dtype=q.dtype, device=q.device).transpose(1, 2)  # [B, Hq, T, D] views
        dk = torch.empty(b, t, hkv, d, dtype=k.dtype, device=k.device).transpose(1, 2)  # every position is in
        dv = torch.empty(b, t, hkv, d, dtype=v.dtype, device=v.device).transpose(1, 2)  # one document

        def document_backward(unit):  # one document's K/V heads [h0, h1): writes its slices of dq, dk, dv
            row, s, e, h0, h1 = unit
            heads, kv_heads = slice(h0 * g, h1 * g), slice(h0, h1)
            pieces = (dout[row, heads, s:e], q[row, heads, s:e], k[row, kv_heads, s:e], v[row, kv_heads, s:e],
                      out[row, heads, s:e], lse[row, heads, s:e])  # [H, n, D] (lse [Hq, n])
            if e - s > BLOCKED_BACKWARD_MIN_LEN and q.dtype == torch.float32:
                grads = _blocked_document_backward(*pieces, ctx.scale)
            else:
                grads = [grad[0] for grad in _backward(*(p[None] for p in pieces), 0.0, True, scale=ctx.scale)]
            for full, piece in zip((dq[row, heads], dk[row, kv_heads], dv[row, kv_heads]), grads):
                full[:, s:e].view(piece.shape).copy_(piece)  # piece [H, n, D], or the blocked dq [Hkv, g, n, D]

        parallel_units(document_backward, _pieces(ctx.spans), hkv, q.device)
        return dq, dk, dv, None, None


def _blocked_document_backward(dout, q, k, v, out, lse, scale):
    """One document's causal attention gradients by batched matmuls, QUERY_BLOCK queries at a time.

    dout, q, out [Hq, n, D], k, v [Hkv, n, D], lse [Hq, n] (the forward's log-sum-exp of the scaled scores)
    -> dq [Hkv, g, n, D] (g = Hq / Hkv), dk, dv [Hkv, n, D]. Query head h reads K/V head h // g (SDPA's GQA), so
    the g heads of a group are stacked into the rows of one matmul, position-major ([Hkv, n g, D]: a block of
    queries is a view, not a copy), and dk, dv come out summed over the group.
    Per block of queries [t0, t1) against keys [0, t1):
        P  = exp(scale q k^T - lse)  (zero above the diagonal)     dv += P^T do
        dS = P * (do v^T - rowsum(do * out))                       dq  = scale dS k,  dk += scale dS^T q
    P is exp2 of log2(e)-scaled logits (torch's CPU exp2 runs at twice the rate of exp), zeroed above the diagonal
    after the exponential: exp of -inf (or of anything that underflows) takes a slow path, about 7x the normal one.
    """
    hkv, n, d = k.shape
    g = q.shape[0] // hkv
    scale = d ** -0.5 if scale is None else scale

    def position_major(x):  # [Hkv g, n, ...] -> [Hkv, n g, ...]
        return x.unflatten(0, (hkv, g)).transpose(1, 2).flatten(1, 2)

    q_rows, dout_rows = position_major(q).contiguous(), position_major(dout).contiguous()  # [Hkv, n g, D]
    lse_log2 = position_major(lse * LOG2_E)[..., None]  # [Hkv, n g, 1]
    delta = position_major(torch.linalg.vecdot(dout, out))[..., None]  # rowsum(do * out) [Hkv, n g, 1]
    k, v = k.contiguous(), v.contiguous()  # [Hkv, n, D]
    dq = torch.empty_like(q_rows)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    above_diagonal = torch.ones(QUERY_BLOCK, QUERY_BLOCK, dtype=torch.bool).triu_(1)[:, None]  # [query, 1, key]
    for t0 in range(0, n, QUERY_BLOCK):
        t1 = min(t0 + QUERY_BLOCK, n)
        m, rows = t1 - t0, slice(t0 * g, t1 * g)
        keys, values = k[:, :t1], v[:, :t1]  # [Hkv, t1, D]
        probs = torch.baddbmm(lse_log2[:, rows], q_rows[:, rows], keys.transpose(1, 2), beta=-1,
                              alpha=scale * LOG2_E).exp2_()  # [Hkv, m g, t1]
        probs.view(hkv, m, g, t1)[..., t0:].masked_fill_(above_diagonal[:m, :, :m], 0.0)
        dv[:, :t1].baddbmm_(probs.transpose(1, 2), dout_rows[:, rows])
        dscores = torch.baddbmm(delta[:, rows], dout_rows[:, rows], values.transpose(1, 2), beta=-1).mul_(probs)
        dq[:, rows] = torch.bmm(dscores, keys)  # [Hkv, m g, D]
        dk[:, :t1].baddbmm_(dscores.transpose(1, 2), q_rows[:, rows])
    dq = dq.mul_(scale).view(hkv, n, g, d).transpose(1, 2)  # [Hkv, g, n, D]
    return dq, dk.mul_(scale), dv


def packed_causal_attention(q, k, v, spans, scale=None):
    """q [B, Hq, T, D], k/v [B, Hkv, T, D] (Hq % Hkv == 0), spans from `document_spans` covering every position
    -> causal attention within each span, [B, Hq, T, D]."""
    return PackedCausalAttention.apply(q, k, v, spans, scale)
