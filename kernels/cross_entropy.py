"""Linear + cross-entropy over the vocabulary without keeping the [N, V] logits.

For a chunk of C tokens: logits = h W^T [C, V] (a matmul), then per row (fp32)
    lse  = log sum_v exp(logits_v)        loss = lse - logits_label
    grad = softmax(logits) - onehot(label)   (zero on ignored rows), written over the logits in place (on the torch
                                             path too, for fp32 logits)
and dh = grad W [C, H], dW += grad^T h (fp32 accumulator). With reduction "mean" or "sum" the whole gradient is
done in the forward, so the backward only scales dh and dW by grad_output (/ number of labelled tokens for
"mean"). With "none" (per-token losses = minus the log-probs DPO sums) each token's gradient is weighted by its own
grad_output, known only in the backward, so the backward recomputes the chunks' logits with those weights.
Peak extra memory: one [C, V] chunk (plus its fp32 copy for 16-bit logits on the torch path) + dh [N, H] + dW [V, H]
fp32, instead of several [N, V] tensors.
FLOPs: 2 N H V for the logits, 2 N H V each for dh and dW; the row kernel reads the chunk twice, writes it once.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import native

# [C, V] chunk budget: C = next power of two >= 2^25 / V (capped at N). SmolLM2 (V = 49,152, fp32, CPU): 1024-row
# chunks (200 MB) take 1.48 s for the loss and gradient of 2048 tokens against 1.55 s at 512 rows and 2.06 at 128.
LOGITS_CHUNK_ELEMENTS = 1 << 25


class CrossEntropyInputError(ValueError):
    """Labels or shapes that cannot be scored; the message names the offending value."""


def fused_linear_cross_entropy_reference(hidden, weight, labels, ignore_index=-100, reduction="mean", chunk_size=None):
    """All [N, V] logits at once (chunk_size is accepted for a common signature and unused)."""
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.T).float()  # [N, V]
    loss = F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction=reduction)
    return loss.view(labels.shape) if reduction == "none" else loss


@triton.jit
def _cross_entropy_rows_kernel(logits_ptr, labels_ptr, loss_ptr, row_scale_ptr, n_cols, ignore_index,
                               BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr, HAS_ROW_SCALE: tl.constexpr):
    """One program per row: online max / sum-exp over V blocks, then (optionally) softmax - onehot in place."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * n_cols
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    running_max = -float("inf")
    running_sum = 0.0
    for v0 in range(0, n_cols, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    target = tl.load(row_ptr + label, mask=valid, other=0.0).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))
    if WRITE_GRAD:
        scale = tl.where(valid, 1.0, 0.0)
        if HAS_ROW_SCALE:
            scale = scale * tl.load(row_scale_ptr + row).to(tl.float32)
        for v0 in range(0, n_cols, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(row_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)
            tl.store(row_ptr + cols, (grad * scale).to(logits_ptr.dtype.element_ty), mask=cols < n_cols)


def cross_entropy_rows_triton(logits, labels, loss, row_scale, ignore_index, write_grad):
    """logits [C, V] (contiguous), labels [C] -> loss [C] (fp32); with write_grad, returns the logits' gradient
    (softmax - onehot, times row_scale, zero on ignored rows) written over the logits."""
    c, v = logits.shape
    if c:
        _cross_entropy_rows_kernel[(c,)](logits, labels, loss, row_scale if row_scale is not None else loss, v,
                                         ignore_index, BLOCK_V=min(triton.next_power_of_2(v), 4096),
                                         WRITE_GRAD=write_grad, HAS_ROW_SCALE=row_scale is not None, num_warps=8)
    return logits if write_grad else None


def cross_entropy_rows_torch(logits, labels, loss, row_scale, ignore_index, write_grad):
    """The same contract as cross_entropy_rows_triton, in torch: log_softmax written over the (fp32) logits in
    place (one vectorised kernel: a max / sum-exp pass and a write pass), then exp_ turns it into the softmax, so a
    chunk never has a second [C, V] buffer."""
    valid = labels != ignore_index  # [C]
    safe_labels = torch.where(valid, labels, 0)[:, None]  # [C, 1]
    dtype = logits.dtype
    logits = logits.float()  # [C, V] fp32 (the same tensor when the logits are fp32)
    log_probs = torch.log_softmax(logits, dim=-1, out=logits)  # [C, V], in place
    loss.copy_(torch.where(valid, log_probs.gather(1, safe_labels)[:, 0].neg(), 0.0))
    if not write_grad:
        return None
    grad = log_probs.exp_()  # softmax, in place
    grad.scatter_add_(1, safe_labels, torch.full_like(loss, -1.0)[:, None])
    if row_scale is not None:
        grad.mul_((valid * row_scale.float())[:, None])
    else:
        ignored = (~valid).nonzero()[:, 0]
        if ignored.numel():
            grad.index_fill_(0, ignored, 0.0)
    return grad.to(dtype)


_cpu_logits_buffers: dict[tuple, torch.Tensor] = {}  # (rows, vocab, dtype) -> the last CPU buffer of that shape


def _logits_buffer(hidden, rows, vocab):
    """The [rows, vocab] chunk buffer. On CPU one buffer is kept between calls: at 100+ MB it is beyond glibc's
    mmap threshold, so a fresh one per call is a fresh mmap whose pages all fault again (49,152 faults per training
    step at 1024 x 49,152 fp32). Nothing that views it outlives the call. CUDA's caching allocator already reuses."""
    if hidden.device.type != "cpu":
        return hidden.new_empty(rows, vocab)
    key = (rows, vocab, hidden.dtype)
    if key not in _cpu_logits_buffers:
        _cpu_logits_buffers.clear()  # one shape at a time: a new shape (eval after training) frees the old one
        _cpu_logits_buffers[key] = hidden.new_empty(rows, vocab)
    return _cpu_logits_buffers[key]


def _chunked_linear_cross_entropy(hidden, weight, labels, ignore_index, chunk, rows_fn, row_scale=None,
                                  need_dh=False, need_dw=False, loss_only=False):
    """Per-token losses [N] (fp32), and, unless loss_only, dh [N, H] and dW [V, H] (fp32) chunk by chunk."""
    n, h = hidden.shape
    v = weight.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
    dh = torch.empty_like(hidden) if need_dh else None
    dw = torch.zeros(v, h, dtype=torch.float32, device=hidden.device) if need_dw else None
    write_grad = not loss_only and (need_dh or need_dw)
    logits_buffer = _logits_buffer(hidden, min(chunk, n), v)  # [C, V], reused by every chunk
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        h_chunk = hidden[start:end]  # [C, H]
        logits = torch.matmul(h_chunk, weight.T, out=logits_buffer[:end - start])  # [C, V]
        grad = rows_fn(logits, labels[start:end], loss[start:end],
                       None if row_scale is None else row_scale[start:end], ignore_index, write_grad)  # [C, V]
        del logits
        if write_grad and need_dh:
            torch.matmul(grad, weight, out=dh[start:end])  # [C, H]
        if write_grad and need_dw:
            _accumulate_dw(dw, grad, h_chunk)
    return loss, dh, dw


def _accumulate_dw(dw, grad, h_chunk):
    """dw [V, H] fp32 += grad^T [V, C] h_chunk [C, H], in place: no [V, H] temporary per chunk."""
    if grad.dtype == torch.float32:
        dw.addmm_(grad.T, h_chunk)
        return
    if grad.is_cuda:
        try:  # cuBLAS: 16-bit inputs, fp32 accumulator read and written in place (beta = 1)
            torch.addmm(dw, grad.T, h_chunk, out_dtype=torch.float32, out=dw)
            return
        except (RuntimeError, TypeError):  # a torch without addmm's out_dtype
            pass
    dw.addmm_(grad.T.float(), h_chunk.float())  # fp32 copies of the chunk: [C, V] and [C, H], not [V, H]


class FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, chunk, rows_fn, grad_enabled):
        need_dh = grad_enabled and ctx.needs_input_grad[0]
        need_dw = grad_enabled and ctx.needs_input_grad[1]
        deferred = reduction == "none"  # per-token weights arrive with grad_output: recompute in the backward
        loss, dh, dw = _chunked_linear_cross_entropy(hidden, weight, labels, ignore_index, chunk, rows_fn,
                                                     need_dh=need_dh and not deferred,
                                                     need_dw=need_dw and not deferred, loss_only=deferred)
        ctx.reduction, ctx.need, ctx.weight_dtype = reduction, (need_dh, need_dw), weight.dtype
        ctx.ignore_index, ctx.chunk, ctx.rows_fn = ignore_index, chunk, rows_fn
        if deferred:
            ctx.save_for_backward(hidden, weight, labels)
            return loss
        n_valid = (labels != ignore_index).sum()
        ctx.save_for_backward(dh, dw, n_valid)
        total = loss.sum()
        return total / n_valid if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_output):
        need_dh, need_dw = ctx.need
        if ctx.reduction == "none":
            hidden, weight, labels = ctx.saved_tensors
            _, dh, dw = _chunked_linear_cross_entropy(hidden, weight, labels, ctx.ignore_index, ctx.chunk,
                                                      ctx.rows_fn, row_scale=grad_output.float().contiguous(),
                                                      need_dh=need_dh, need_dw=need_dw)
            return dh, dw.to(weight.dtype) if need_dw else None, None, None, None, None, None, None
        dh, dw, n_valid = ctx.saved_tensors
        scale = grad_output / n_valid.clamp(min=1) if ctx.reduction == "mean" else grad_output  # fp32 scalar
        # New tensors: the saved dh, dw stay as they are, so a second backward (retain_graph) gets the same.
        dh = dh * scale.to(dh.dtype) if need_dh else None
        if need_dw:
            dw = dw * scale if ctx.weight_dtype == torch.float32 else dw.to(ctx.weight_dtype).mul_(scale)
        else:
            dw = None
        return dh, dw, None, None, None, None, None, None


def _prepare(hidden, weight, labels, ignore_index, reduction, chunk_size):
    if reduction not in ("mean", "sum", "none"):
        raise CrossEntropyInputError(f"fused_linear_cross_entropy: reduction={reduction!r}, expected mean/sum/none")
    if hidden.shape[-1] != weight.shape[1] or hidden.shape[:-1] != labels.shape:
        raise CrossEntropyInputError(f"fused_linear_cross_entropy: hidden {tuple(hidden.shape)}, weight "
                                     f"{tuple(weight.shape)} and labels {tuple(labels.shape)} do not match "
                                     f"(expected [..., H], [V, H], [...])")
    if hidden.dtype != weight.dtype:
        raise CrossEntropyInputError(f"fused_linear_cross_entropy: hidden {hidden.dtype} and weight {weight.dtype}")
    vocab = weight.shape[0]
    labels_flat = labels.reshape(-1)
    bad = (labels_flat != ignore_index) & ((labels_flat < 0) | (labels_flat >= vocab))
    if bad.any():
        first = labels_flat[bad][0].item()
        raise CrossEntropyInputError(f"fused_linear_cross_entropy: label {first} is outside the vocabulary "
                                     f"[0, {vocab}) and is not ignore_index={ignore_index}")
    n = labels_flat.numel()
    chunk = chunk_size or triton.next_power_of_2(triton.cdiv(LOGITS_CHUNK_ELEMENTS, vocab))
    return hidden.reshape(n, hidden.shape[-1]), labels_flat.contiguous(), max(1, min(chunk, n))


def _fused(hidden, weight, labels, ignore_index, reduction, chunk_size, rows_fn):
    hidden2, labels_flat, chunk = _prepare(hidden, weight, labels, ignore_index, reduction, chunk_size)
    out = FusedLinearCrossEntropy.apply(hidden2, weight, labels_flat, ignore_index, reduction, chunk, rows_fn,
                                        torch.is_grad_enabled())
    return out.view(labels.shape) if reduction == "none" else out


def fused_linear_cross_entropy_triton(hidden, weight, labels, ignore_index=-100, reduction="mean", chunk_size=None):
    """Matmuls by torch (cuBLAS), softmax/loss/gradient rows by the Triton kernel."""
    return _fused(hidden, weight, labels, ignore_index, reduction, chunk_size, cross_entropy_rows_triton)


def fused_linear_cross_entropy_torch(hidden, weight, labels, ignore_index=-100, reduction="mean", chunk_size=None):
    return _fused(hidden, weight, labels, ignore_index, reduction, chunk_size, cross_entropy_rows_torch)


def fused_linear_cross_entropy_native(hidden, weight, labels, ignore_index=-100, reduction="mean", chunk_size=None):
    """Matmuls by torch, softmax/loss/gradient rows by the fused C kernel (kernels/native.py): fp32 CPU tensors."""
    native.require("fused_linear_cross_entropy", hidden, weight, contiguous=False)
    return _fused(hidden, weight, labels, ignore_index, reduction, chunk_size, native.cross_entropy_rows)
