"""RMSNorm: y = weight * cast(x / sqrt(mean(x^2) + eps)), normalized in fp32 (Hugging Face rounding order).

Backward, with n = x * rstd (fp32) and dn = dy * weight:
    dx      = rstd * (dn - n * mean(dn * n))            per row
    dweight = sum over rows of dy * cast(n)
Only x and rstd [rows] (fp32) are kept for the backward. Cost per row of length N: forward reads x and weight and
writes y (bytes ~ 2 N itemsize), backward reads x, dy and writes dx (~ 3 N itemsize) plus the dweight partials.
"""
import torch
import triton
import triton.language as tl

from . import native


def rms_norm_reference(x, weight, eps):
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


@triton.jit
def _rms_norm_forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, eps,
                             BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    normed = (x * rstd).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_backward_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, n_rows, n_cols,
                              rows_per_program, BLOCK: tl.constexpr, COMPUTE_DW: tl.constexpr):
    """Each program walks `rows_per_program` rows and writes its own dweight partial sum (deterministic)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    offs = row_start.to(tl.int64) * n_cols + cols
    for row in range(row_start, row_end):
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        n = x * rstd
        dn = dy * w
        dx = rstd * (dn - n * (tl.sum(dn * n, axis=0) / n_cols))
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw_acc += dy * n.to(x_ptr.dtype.element_ty).to(tl.float32)
        offs += n_cols
    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid * n_cols + cols, dw_acc, mask=mask)


def _block_and_warps(n_cols):
    block = triton.next_power_of_2(n_cols)
    return block, min(max(block // 256, 1), 16)


class RMSNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()  # [rows, N]
        weight = weight.contiguous()
        rows, n_cols = x2.shape
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty(rows, n_cols, dtype=out_dtype, device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block, warps = _block_and_warps(n_cols)
        if rows:
            _rms_norm_forward_kernel[(rows,)](x2, weight, y, rstd, n_cols, eps, BLOCK=block, num_warps=warps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        rows, n_cols = x2.shape
        dy2 = dy.reshape(rows, n_cols).contiguous()
        dx = torch.empty_like(x2)
        compute_dw = ctx.needs_input_grad[1]
        n_programs = _num_programs(x2.device, rows)
        rows_per_program = triton.cdiv(rows, n_programs) if rows else 1
        dw_partial = torch.empty(n_programs, n_cols, dtype=torch.float32, device=x2.device)
        block, warps = _block_and_warps(n_cols)
        if rows:
            _rms_norm_backward_kernel[(n_programs,)](dy2, x2, weight, rstd, dx, dw_partial, rows, n_cols,
                                                     rows_per_program, BLOCK=block, COMPUTE_DW=compute_dw,
                                                     num_warps=warps)
        dw = None
        if compute_dw:
            dw = (dw_partial.sum(0) if rows else torch.zeros(n_cols, device=x2.device)).to(weight.dtype)
        return dx.view(ctx.shape), dw, None


def _check_features(x, weight):
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: x has {x.shape[-1]} features but weight has {weight.shape[0]}")


def _num_programs(device, rows):
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(rows, 4 * sms))
    return max(1, min(rows, 8))


def rms_norm_triton(x, weight, eps):
    _check_features(x, weight)
    return RMSNormTriton.apply(x, weight, eps)


class RMSNormTorch(torch.autograd.Function):
    """The reference's exact forward; keeps only x and rstd (the reference's autograd keeps x32 and normed too).
    The backward folds the row term into one coefficient: with dn = dy * weight,
        dx = rstd * dn - x * rstd^3 * sum(dn * x) / N,
    two in-place passes over dn after one fused dot (the reference's form needs normed, dn * normed and three more
    passes)."""

    @staticmethod
    def forward(ctx, x, weight, eps, out):
        if x.dtype == torch.float32:  # one buffer: the squares, then the result (the same values as below)
            y = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
            rstd = torch.rsqrt(torch.pow(x, 2, out=y).mean(-1, keepdim=True) + eps)  # [..., 1]
            y = torch.mul(x, rstd, out=y)  # [..., N]
        else:
            x32 = x.float()
            rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1], Hugging Face's rounding order
            y = (x32 * rstd).to(x.dtype) if out is None else out.copy_(x32 * rstd)  # [..., N]
        y = y.mul_(weight) if weight.dtype == y.dtype else weight * y  # in place unless weight's dtype promotes
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        n_cols = x.shape[-1]
        x32 = x.float()
        dx = dw = None
        if ctx.needs_input_grad[1]:
            normed = (x32 * rstd).to(x.dtype)
            dw = (dy * normed).reshape(-1, n_cols).sum(0, dtype=torch.float32).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            dn = dy.float() * weight.float()  # [..., N] fp32
            coefficient = torch.linalg.vecdot(dn, x32, dim=-1).unsqueeze(-1).mul_(rstd.pow(3)).div_(-n_cols)
            dx = dn.mul_(rstd).addcmul_(x32, coefficient).to(x.dtype)
        return dx, dw, None, None


class RMSNormNative(torch.autograd.Function):
    """Contiguous fp32 CPU tensors: RMSNormTorch's math, each way in one fused pass per row (kernels/cpu_fused.c);
    keeps x and rstd. A trained weight's gradient is the torch expression."""

    @staticmethod
    def forward(ctx, x, weight, eps, out):
        y, rstd = native.rms_norm_forward(x, weight, eps, out)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dy = dy.contiguous()
        dx = native.rms_norm_backward(dy, x, weight, rstd) if ctx.needs_input_grad[0] else None
        dw = (dy * x * rstd[..., None]).reshape(-1, x.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


def rms_norm_native(x, weight, eps, out=None):
    """out: as for rms_norm_torch."""
    _check_features(x, weight)
    native.require("rms_norm", x, weight)
    return RMSNormNative.apply(x, weight, eps, out)


def rms_norm_torch(x, weight, eps, out=None):
    """out: an optional contiguous buffer of x's shape and dtype to write the result into (kernels/rebuild.py)."""
    _check_features(x, weight)
    return RMSNormTorch.apply(x, weight, eps, out)
