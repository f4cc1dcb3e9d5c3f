"""The engine's hot paths. Each op has a Triton side (CUDA, or CPU under TRITON_INTERPRET=1) and a torch side.

On CPU, RMSNorm, SwiGLU, RoPE and the cross-entropy rows have a third side for contiguous fp32 tensors, fused C
kernels (kernels/native.py). `HIPPO_KERNELS=triton|torch|native` forces one side for every op (native where it
applies, torch elsewhere); by default CUDA tensors take Triton, and CPU tensors native where it applies and torch
elsewhere. Tensors follow `scaled_dot_product_attention`'s layout: [B, H, T, D].
"""
import os

import torch


def _forced_side() -> str:
    choice = os.environ.get("HIPPO_KERNELS", "").strip().lower()
    if choice not in ("", "triton", "torch", "native"):
        raise ValueError(f"HIPPO_KERNELS={choice!r}: expected 'triton', 'torch' or 'native'")
    return choice


def use_triton(t: torch.Tensor, cuda_default: bool = True) -> bool:
    """HIPPO_KERNELS when set; else Triton for CUDA tensors (unless cuda_default=False: an op whose torch side is
    the faster one on a GPU)."""
    choice = _forced_side()
    if choice:
        return choice == "triton"
    return t.is_cuda and cuda_default


def use_native(*tensors: torch.Tensor, contiguous: bool = True) -> bool:
    """The fused C kernels (kernels/native.py) for fp32 CPU tensors (contiguous unless the op copes with any
    layout), unless HIPPO_KERNELS names another side."""
    from . import native
    return _forced_side() in ("", "native") and native.usable(*tensors, contiguous=contiguous)


def rms_norm(x, weight, eps, out=None):
    """x [..., N] -> x / rms(x) * weight. out: a contiguous buffer of x's shape the torch side writes the result
    into (kernels/rebuild.py's scratch); the Triton side allocates its own."""
    from . import rmsnorm as op
    if use_triton(x):
        return op.rms_norm_triton(x, weight, eps)
    if use_native(x, weight):
        return op.rms_norm_native(x, weight, eps, out=out)
    return op.rms_norm_torch(x, weight, eps, out=out)


def attention(q, k, v, causal=True, sliding_window=None, segment_ids=None, scale=None):
    """q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] with Hq % Hkv == 0 -> [B, Hq, Tq, D].

    Causal masking is bottom-right aligned (query i sits at key position i + Tk - Tq, as with a KV cache).
    `sliding_window=W`: a query sees itself and the W - 1 keys before it. `segment_ids` [B, T] (Tq == Tk):
    packed documents; a query only sees keys with the same segment id. Torch side: packed causal rows whose
    documents are contiguous runs (and no window narrower than T) take kernels/cpu_attention.py, the rest SDPA.
    """
    from . import flash_attention as op
    if use_triton(q):
        return op.attention_triton(q, k, v, causal=causal, sliding_window=sliding_window, segment_ids=segment_ids,
                                   scale=scale)
    op.check_attention_inputs(q, k, v, sliding_window, segment_ids)
    window_binds = sliding_window is not None and sliding_window < k.shape[2]
    if causal and segment_ids is not None and q.shape[2] == k.shape[2] and not window_binds:
        from . import cpu_attention
        spans = cpu_attention.document_spans(segment_ids)
        if spans is not None:  # packed rows: one node, a blocked loop per document (kernels/cpu_attention.py)
            return cpu_attention.packed_causal_attention(q, k, v, spans, scale)
    return op.attention_torch(q, k, v, causal=causal, sliding_window=sliding_window, segment_ids=segment_ids,
                              scale=scale)


def lora_linear(x, weight, lora_a, lora_b, scale):
    """x [..., in], weight [out, in], lora_a [r, in], lora_b [out, r] -> x W^T + scale (x A^T) B^T.

    CUDA takes the torch side (two cuBLAS matmuls and an in-place addmm_) unless HIPPO_KERNELS=triton: the fused
    kernel has not been measured faster than it (see kernels/lora.py)."""
    from . import lora as op
    fn = op.lora_linear_triton if use_triton(x, cuda_default=False) else op.lora_linear_torch
    return fn(x, weight, lora_a, lora_b, scale)


def lora_linears(x, projections, scales):
    """Several LoRA linears of one input: x [..., in], projections [(weight [out_i, in], lora_a [r_i, in],
    lora_b [out_i, r_i])], scales [s_i] -> the tuple of x W_i^T + s_i (x A_i^T) B_i^T. The torch side stacks the
    A factors (one thin matmul instead of one per projection); the Triton side runs the fused kernel per
    projection."""
    from . import lora as op
    if use_triton(x, cuda_default=False):
        return tuple(op.lora_linear_triton(x, *projection, scale) for projection, scale in zip(projections, scales))
    return op.lora_linears_torch(x, projections, scales)


def apply_rope(q, k, cos, sin):
    """q [B, Hq, T, D], k [B, Hkv, T, D], cos/sin [B, T, D] (rotate-half convention) -> (q, k) rotated."""
    from . import rope as op
    if use_triton(q):
        return op.apply_rope_triton(q, k, cos, sin)
    if use_native(q.transpose(1, 2), k.transpose(1, 2), cos, sin):  # q, k: views of [B, T, H, D] memory
        return op.apply_rope_native(q, k, cos, sin)
    return op.apply_rope_torch(q, k, cos, sin)


def swiglu(gate, up, out=None, rebuild=False):
    """silu(gate) * up, elementwise. out: as for rms_norm. rebuild: mark the output to be rebuilt in the backward
    instead of kept by the op that saves it (kernels/rebuild.py); on the torch side SwiGLU's own backward then
    reuses the rebuild's silu(gate)."""
    from . import activation as op
    from .rebuild import rebuild_in_backward
    if use_triton(gate):
        hidden = op.swiglu_triton(gate, up)
        return rebuild_in_backward(hidden, op.swiglu_triton, gate, up) if rebuild else hidden
    if use_native(gate, up):
        from . import native
        hidden = op.swiglu_native(gate, up, out=out)
        return rebuild_in_backward(hidden, native.swiglu_forward, gate, up) if rebuild else hidden
    shared = op.SharedSilu() if rebuild else None
    hidden = op.swiglu_torch(gate, up, out=out, shared_silu=shared)
    return rebuild_in_backward(hidden, shared.rebuild, gate, up) if rebuild else hidden


def fused_linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="mean", chunk_size=None):
    """hidden [N, H], weight [V, H], labels [N] -> cross-entropy of hidden @ weight.T without keeping [N, V] logits.

    hidden [..., H] with labels [...] works too. reduction: "mean" over non-ignored labels, "sum", or "none"
    (labels' shape, zero where ignored; minus the per-token log-probs). chunk_size: tokens per logits chunk
    (default: about 2^25 logits per chunk).
    """
    from . import cross_entropy as op
    if use_triton(hidden):
        fn = op.fused_linear_cross_entropy_triton
    elif use_native(hidden, weight, contiguous=False):  # the C kernel sees only its own logits buffer
        fn = op.fused_linear_cross_entropy_native
    else:
        fn = op.fused_linear_cross_entropy_torch
    return fn(hidden, weight, labels, ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size)
