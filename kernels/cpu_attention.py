"""Causal attention over packed documents on CPU: one autograd node per layer, blocked matmuls per document.

Rows of a packed batch hold several documents; a query sees the keys of its own document up to itself. Cutting
q, k, v with `split` per row and per document and calling SDPA on each piece (the earliest CPU path) makes the
backward pay for the gradient of every split and a cat per document and per row. Here one Function runs each
document, on [B, T, H, D] views of the projections' outputs, through a blocked loop of batched matmuls:
QUERY_BLOCK queries at a time against the keys up to the block's end, the g query heads that share a K/V head
stacked position-major into one matmul ([Hkv, n g, D]: a block of queries is a view, GQA without repeating K/V),
the exponentials as exp2 of log2(e)-scaled scores (torch's CPU exp2 runs at twice the rate of exp). It keeps q, k, v,
the output and the log-sum-exp: never T x T probabilities. 16-bit inputs compute in fp32, fp64 in fp64. In fp32
with the fused C kernels (kernels/native.py, unless HIPPO_KERNELS=torch), a block's causal mask, row max,
exponentials and row sum are one pass per row, and so are the backward's probabilities and its dP - delta product;
the torch ops below are the fallback (and fp64's path).

Measured on this machine (Hq=9, Hkv=3, D=64, fp32, one thread, one 512-token document): the forward takes
6.4-7.5 ms against 9.3 for torch's CPU flash kernel (`aten._scaled_dot_product_flash_attention_for_cpu`, which
this file called before), the backward's loop 13.6-14.0 ms against 16.3-17.3 for the blocked backward it
replaces. In profiled training steps of the benchmark workload (4 rows of 1-3 documents, 2 threads; 3-4 steps
each way on a noisy machine) the forward takes 24.4 ms per layer instead of 26.3, the backward 41 ms either
way. Blocks of 64 queries beat 128 (the block's probabilities outgrow the L2). Documents run in parallel, each on
one single-threaded worker (`parallel_units`), in the forward and the backward.
"""
from __future__ import annotations

import torch

from . import native, ops

QUERY_BLOCK = 64
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


def parallel_units(fn, pieces, kv_heads: int, device) -> None:
    """Run fn((row, start, end, first K/V head, end K/V head)) over every document, in parallel over documents.

    Torch's intra-op threads split each small op of the blocked backward (a 64-query block's matmuls and
    exponentials) between the cores and wait for one another after each: on 2 cores that gains 1.3x over one
    thread, where a document per single-threaded worker gains 1.8x (4 x 512-token documents: 34 ms instead of 42).
    The longest documents go first (a worker takes the next one when it is free), and a document with more than a
    worker's share of the work is cut into its K/V heads, which are independent. Units write disjoint slices."""
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
    list(native.worker_pool(workers).map(run, units))  # re-raises a unit's exception here


def _rows_of(x, row, s, e, h0, h1, group):
    """x [B, Hq, T, D], a view of [B, T, Hq, D] memory -> [h1 - h0, e - s, group D]: per K/V head in [h0, h1), one
    row per position holding its `group` query heads (a view; a copy when x has another layout)."""
    return x.transpose(1, 2)[row, s:e, h0 * group:h1 * group].unflatten(1, (h1 - h0, -1)).flatten(2).transpose(0, 1)


def _compute_dtype(x):
    """fp32, or fp64 for fp64 inputs: 16-bit inputs compute in fp32."""
    return torch.promote_types(x.dtype, torch.float32)


def _position_major(rows, d, scale=1.0):
    """[Hkv, n, g D] from _rows_of -> scale * rows as [Hkv, n g, D] (fp32 or fp64), contiguous: the g query heads
    that share a K/V head stacked position by position, so a block of queries is a view of one K/V head's rows."""
    stacked = torch.empty(rows.shape, dtype=_compute_dtype(rows), device=rows.device)  # a copy: scaled in place
    stacked.copy_(rows)
    return (stacked.mul_(scale) if scale != 1.0 else stacked).view(rows.shape[0], -1, d)


class PackedCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spans, scale):
        """q [B, Hq, T, D], k/v [B, Hkv, T, D] -> [B, Hq, T, D] (a view of [B, T, Hq, D] memory)."""
        b, hq, t, d = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        scale = d ** -0.5 if scale is None else scale
        out = torch.empty(b, t, hq, d, dtype=q.dtype, device=q.device).transpose(1, 2)  # [B, Hq, T, D] view
        dtype = _compute_dtype(q)
        lse = torch.empty(b, hkv, t * g, 1, dtype=dtype, device=q.device)  # log2 units, position-major

        def document_forward(unit):  # one document's K/V heads [h0, h1): writes its slices of out and lse
            row, s, e, h0, h1 = unit
            q_rows = _position_major(_rows_of(q, row, s, e, h0, h1, g), d, scale * LOG2_E)  # [Hkv, n g, D]
            out_rows = _blocked_document_forward(q_rows, k[row, h0:h1, s:e].to(dtype), v[row, h0:h1, s:e].to(dtype),
                                                 lse[row, h0:h1, s * g:e * g])  # [Hkv, n g, D]
            _rows_of(out, row, s, e, h0, h1, g).copy_(out_rows.view(h1 - h0, e - s, -1))

        parallel_units(document_forward, _pieces(spans), hkv, q.device)
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
        # dk, dv add up over the blocks: each unit zeroes its own slices (on its worker: in the caller's thread a
        # layer-wide zeros cost 3 ms, the pages' first touch)
        dtype = lse.dtype
        dk = torch.empty(b, t, hkv, d, dtype=dtype, device=k.device).transpose(1, 2)
        dv = torch.empty(b, t, hkv, d, dtype=dtype, device=v.device).transpose(1, 2)

        def document_backward(unit):  # one document's K/V heads [h0, h1): writes its slices of dq, dk, dv
            row, s, e, h0, h1 = unit
            dk_piece, dv_piece = dk[row, h0:h1, s:e].zero_(), dv[row, h0:h1, s:e].zero_()  # [Hkv, n, D]
            dout_rows, out_rows = _rows_of(dout, row, s, e, h0, h1, g), _rows_of(out, row, s, e, h0, h1, g)
            delta = torch.linalg.vecdot(dout_rows.to(dtype).unflatten(2, (g, d)),
                                        out_rows.to(dtype).unflatten(2, (g, d)))  # rowsum(dO O) [Hkv, n, g]
            dq_rows = _blocked_document_backward(
                _position_major(_rows_of(q, row, s, e, h0, h1, g), d, ctx.scale * LOG2_E),
                k[row, h0:h1, s:e].to(dtype), v[row, h0:h1, s:e].to(dtype), _position_major(dout_rows, d),
                lse[row, h0:h1, s * g:e * g], delta.view(h1 - h0, -1, 1), dk_piece, dv_piece, ctx.scale)
            _rows_of(dq, row, s, e, h0, h1, g).copy_(dq_rows.view(h1 - h0, e - s, -1))

        parallel_units(document_backward, _pieces(ctx.spans), hkv, dout.device)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None


_masks: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _query_blocks(n, group, device):
    """Per block of QUERY_BLOCK queries [t0, t1) of an n-token document: (t0, t1, its rows of a position-major
    [Hkv, n g, ...] tensor, and its masks against its own keys [m, g, m], position-major ([query, head in group,
    key]): additive (0 on and below the diagonal, -inf above) and multiplicative (1 and 0))."""
    for t0 in range(0, n, QUERY_BLOCK):
        t1 = min(t0 + QUERY_BLOCK, n)
        m = t1 - t0
        key = (m, group, device)
        if key not in _masks:
            visible = torch.ones(m, m, device=device).tril_()[:, None].expand(m, group, m).contiguous()
            _masks[key] = (torch.zeros_like(visible).masked_fill_(visible == 0, float("-inf")), visible)
        yield t0, t1, slice(t0 * group, t1 * group), *_masks[key]


def _blocked_document_forward(q, k, v, lse):
    """One document's causal attention, QUERY_BLOCK queries at a time against the keys up to the block's end.

    q [Hkv, n g, D] (position-major, log2(e)-scaled: q k^T are the scores in log2 units), k, v [Hkv, n, D]
    -> out [Hkv, n g, D]; writes lse [Hkv, n g, 1] (log2 of the softmax denominator, max included).
    Future keys exist only in the block's own keys; they get -inf for the max, then -126 before exp2 and 0 after:
    exp2 of -inf, or of anything that underflows, takes a slow path about 7x the normal one on this CPU. Clamping
    the block's own keys at 2^-126 changes a probability by at most 1e-38.
    """
    hkv, n, _ = k.shape
    g = q.shape[1] // n
    out = torch.empty_like(q)
    fused = ops.use_native(q)  # the softmax numerator in one pass (kernels/native.py)
    for t0, t1, rows, future_inf, visible in _query_blocks(n, g, q.device):
        scores = torch.bmm(q[:, rows], k[:, :t1].transpose(1, 2))  # [Hkv, m g, t1]
        if fused:
            row_max, row_sum = native.attention_forward_block(scores, t0, g)  # [Hkv, m g, 1] each
            probs = scores
        else:
            own_keys = scores.view(hkv, t1 - t0, g, t1)[..., t0:]  # [Hkv, m, g, m]
            own_keys.add_(future_inf)
            row_max = scores.amax(-1, keepdim=True)  # [Hkv, m g, 1]
            scores.sub_(row_max)
            own_keys.clamp_(min=-126.0)
            probs = scores.exp2_()
            own_keys.mul_(visible)
            row_sum = probs.sum(-1, keepdim=True)  # [Hkv, m g, 1]
        torch.bmm(probs, v[:, :t1], out=out[:, rows]).div_(row_sum)
        torch.add(row_max, row_sum.log2_(), out=lse[:, rows])
    return out


def _blocked_document_backward(q, k, v, dout, lse, delta, dk, dv, scale):
    """One document's causal attention gradients by batched matmuls, QUERY_BLOCK queries at a time.

    q, dout [Hkv, n g, D] (position-major; q log2(e)-scaled as in the forward), k, v [Hkv, n, D], lse and
    delta = rowsum(dout * out) [Hkv, n g, 1] -> dq [Hkv, n g, D]; adds into dk, dv [Hkv, n, D] (any row stride).
    With q = log2(e) scale q' (q' the caller's queries) the scores are z = scale q' k^T = ln(2) q k^T, so per block
    of queries [t0, t1) against keys [0, t1):
        P  = exp2(q k^T - lse)  (zero above the diagonal)          dv += P^T do
        dS = P * (do v^T - delta)                                  dq  = scale dS k,  dk += ln(2) dS^T q
    The future keys' logits are zeroed before exp2 (they could overflow) and their probabilities after.
    """
    hkv, n, d = k.shape
    g = q.shape[1] // n
    dq = torch.empty_like(q)
    fused = ops.use_native(q)  # each elementwise step in one pass (kernels/native.py)
    for t0, t1, rows, _, visible in _query_blocks(n, g, q.device):
        keys, values = k[:, :t1], v[:, :t1]  # [Hkv, t1, D]
        logits = torch.bmm(q[:, rows], keys.transpose(1, 2))  # [Hkv, m g, t1]
        if fused:
            probs = native.attention_backward_probs(logits, lse[:, rows], t0, g)
        else:
            logits.sub_(lse[:, rows])
            own_keys = logits.view(hkv, t1 - t0, g, t1)[..., t0:]
            own_keys.mul_(visible)
            probs = logits.exp2_()
            own_keys.mul_(visible)
        dv[:, :t1].baddbmm_(probs.transpose(1, 2), dout[:, rows])
        dprobs = torch.bmm(dout[:, rows], values.transpose(1, 2))  # [Hkv, m g, t1]
        if fused:
            dscores = native.attention_backward_dscores(dprobs, probs, delta[:, rows])
        else:
            dscores = dprobs.sub_(delta[:, rows]).mul_(probs)
        torch.bmm(dscores, keys, out=dq[:, rows])
        dk[:, :t1].baddbmm_(dscores.transpose(1, 2), q[:, rows], alpha=1 / LOG2_E)
    return dq.mul_(scale)


def packed_causal_attention(q, k, v, spans, scale=None):
    """q [B, Hq, T, D], k/v [B, Hkv, T, D] (Hq % Hkv == 0), spans from `document_spans` covering every position
    -> causal attention within each span, [B, Hq, T, D]."""
    return PackedCausalAttention.apply(q, k, v, spans, scale)
