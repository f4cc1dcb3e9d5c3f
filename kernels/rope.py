"""Rotary position embedding, rotate-half convention (Hugging Face LLaMA/Mistral layout).

With x = [x1, x2] split into halves of the head dim and cos = [c1, c2], sin = [s1, s2]:
    forward   y1 = x1 c1 - x2 s1          y2 = x2 c2 + x1 s2
    backward dx1 = dy1 c1 + dy2 s2       dx2 = dy2 c2 - dy1 s1
so the backward is the forward with (s1, s2) replaced by (-s2, -s1). One program per (batch, position) rotates
every q and k head there, reading cos/sin once. No activation is saved (cos/sin are inputs). Memory-bound:
read and write q and k once each.
"""
import torch
import triton
import triton.language as tl

from . import native


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(q, k, cos, sin):
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, D]
    q_rot = (q * cos + rotate_half(q) * sin).to(q.dtype)
    k_rot = (k * cos + rotate_half(k) * sin).to(k.dtype)
    return q_rot, k_rot


@triton.jit
def _rotate_heads(x_ptr, y_ptr, x_strides_b, x_strides_h, x_strides_t, y_strides_b, y_strides_h, y_strides_t,
                  b, t, n_heads, c1, c2, s1, s2, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
    dims = tl.arange(0, BLOCK_HALF)[None, :]  # [1, BLOCK_HALF]
    mask = (heads < n_heads) & (dims < HALF)
    x_base = x_ptr + b * x_strides_b + t * x_strides_t + heads * x_strides_h + dims
    y_base = y_ptr + b * y_strides_b + t * y_strides_t + heads * y_strides_h + dims
    x1 = tl.load(x_base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_base + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_base, (x1 * c1 - x2 * s1).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_base + HALF, (x2 * c2 + x1 * s2).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr,
                 qs_b, qs_h, qs_t, ks_b, ks_h, ks_t, qos_b, qos_h, qos_t, kos_b, kos_h, kos_t,
                 cs_b, cs_t, n_pos, n_q_heads, n_k_heads,
                 HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 BACKWARD: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // n_pos).to(tl.int64)
    t = (pid % n_pos).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    dmask = dims < HALF
    cs = b * cs_b + t * cs_t + dims
    c1 = tl.load(cos_ptr + cs, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + cs + HALF, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + cs, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + cs + HALF, mask=dmask, other=0.0).to(tl.float32)
    if BACKWARD:
        s1, s2 = -s2, -s1
    _rotate_heads(q_ptr, q_out_ptr, qs_b, qs_h, qs_t, qos_b, qos_h, qos_t, b, t, n_q_heads, c1, c2, s1, s2,
                  HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr, k_out_ptr, ks_b, ks_h, ks_t, kos_b, kos_h, kos_t, b, t, n_k_heads, c1, c2, s1, s2,
                  HALF, BLOCK_HK, BLOCK_HALF)


def _unit_last_stride(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(q, k, cos, sin, backward):
    """Rotate q [B, Hq, T, D] and k [B, Hkv, T, D] (any strides with a unit last one) into new tensors."""
    q, k = _unit_last_stride(q), _unit_last_stride(k)
    cos, sin = _unit_last_stride(cos), _unit_last_stride(sin)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    b, hq, t, d = q.shape
    hk = k.shape[1]
    if b * t:
        _rope_kernel[(b * t,)](
            q, k, q_out, k_out, cos, sin,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
            cos.stride(0), cos.stride(1), t, hq, hk,
            HALF=d // 2, BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HK=triton.next_power_of_2(hk),
            BLOCK_HALF=triton.next_power_of_2(d // 2), BACKWARD=backward, num_warps=4)
    return q_out, k_out


def _check(q, k, cos, sin):
    b, _, t, d = q.shape
    if k.shape[0] != b or k.shape[2:] != q.shape[2:] or d % 2:
        raise ValueError(f"apply_rope: q {tuple(q.shape)} and k {tuple(k.shape)} need the same B, T and an even D")
    if cos.shape != (b, t, d) or sin.shape != (b, t, d):
        raise ValueError(f"apply_rope: cos/sin must be [B, T, D] = {(b, t, d)}, got {tuple(cos.shape)}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("apply_rope: cos/sin are not differentiated; pass them without requires_grad")


class RoPETriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq_rot, dk_rot):
        cos, sin = ctx.saved_tensors
        dq, dk = _launch(dq_rot, dk_rot, cos, sin, backward=True)
        return dq, dk, None, None


def apply_rope_triton(q, k, cos, sin):
    _check(q, k, cos, sin)
    return RoPETriton.apply(q, k, cos, sin)


def rotate_torch(x, cos, sin, adjoint=False):
    """x [B, H, T, D], cos/sin [B, 1, T, D] -> x cos + rotate_half(x) sin, or with adjoint=True its transpose
    g cos + rotate_half^T(g sin), as one product and two in-place halves (no rotated copy, no concatenation):
        forward  y1 = x1 c1 - x2 s1,  y2 = x2 c2 + x1 s2
        adjoint  y1 = x1 c1 + x2 s2,  y2 = x2 c2 - x1 s1"""
    half = x.shape[-1] // 2
    out = x * cos
    x1, x2, out1, out2 = x[..., :half], x[..., half:], out[..., :half], out[..., half:]
    sin1, sin2 = sin[..., :half], sin[..., half:]
    if adjoint:
        out1.addcmul_(x2, sin2)
        out2.addcmul_(x1, sin1, value=-1)
    else:
        out1.addcmul_(x2, sin1, value=-1)
        out2.addcmul_(x1, sin2)
    return out


class RoPETorch(torch.autograd.Function):
    """The reference's math without its temporaries; the backward applies the transposed rotation and keeps no
    activation."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, D]
        return rotate_torch(q, cos, sin), rotate_torch(k, cos, sin)

    @staticmethod
    def backward(ctx, dq_rot, dk_rot):
        cos, sin = ctx.saved_tensors
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, D]
        return rotate_torch(dq_rot, cos, sin, adjoint=True), rotate_torch(dk_rot, cos, sin, adjoint=True), None, None


class RoPENative(torch.autograd.Function):
    """q, k [B, H, T, D] as views of contiguous [B, T, H, D] memory, fp32 CPU: each rotation one fused pass
    (kernels/cpu_fused.c); keeps no activation."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return native.rope(q, cos, sin), native.rope(k, cos, sin)

    @staticmethod
    def backward(ctx, dq_rot, dk_rot):
        cos, sin = ctx.saved_tensors
        return _rope_native_adjoint(dq_rot, cos, sin), _rope_native_adjoint(dk_rot, cos, sin), None, None


def _rope_native_adjoint(grad, cos, sin):
    if not native.heads_last(grad):
        grad = grad.transpose(1, 2).contiguous().transpose(1, 2)
    return native.rope(grad, cos, sin, adjoint=True)


def apply_rope_native(q, k, cos, sin):
    _check(q, k, cos, sin)
    native.require("apply_rope", q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return RoPENative.apply(q, k, cos, sin)


def apply_rope_torch(q, k, cos, sin):
    _check(q, k, cos, sin)
    return RoPETorch.apply(q, k, cos, sin)
