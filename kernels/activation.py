"""SwiGLU activation: silu(gate) * up, with silu(g) = g * sigmoid(g).

Backward, recomputing sigmoid from the saved inputs (nothing else is kept):
    d_up   = dy * silu(g)
    d_gate = dy * up * sigmoid(g) * (1 + g * (1 - sigmoid(g)))
Memory-bound: the forward reads 2 and writes 1 tensor, the backward reads 3 and writes 2.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import native


def swiglu_reference(gate, up):
    return F.silu(gate) * up


BLOCK = 1024


@triton.jit
def _swiglu_forward_kernel(gate_ptr, up_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    silu = (g * tl.sigmoid(g)).to(gate_ptr.dtype.element_ty)  # rounded like F.silu before the product
    tl.store(out_ptr + offs, (silu.to(tl.float32) * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(dy_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(dup_ptr + offs, (dy * silu).to(dup_ptr.dtype.element_ty), mask=mask)
    dgate = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(dgate_ptr + offs, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)


def _check(gate, up):
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} differ")


class SwiGLUTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        numel = gate.numel()
        if numel:
            _swiglu_forward_kernel[(triton.cdiv(numel, BLOCK),)](gate, up, out, numel, BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        numel = gate.numel()
        if numel:
            _swiglu_backward_kernel[(triton.cdiv(numel, BLOCK),)](dy, gate, up, dgate, dup, numel, BLOCK=BLOCK,
                                                                  num_warps=4)
        return dgate, dup


def swiglu_triton(gate, up):
    _check(gate, up)
    return SwiGLUTriton.apply(gate, up)


class SharedSilu:
    """The recipe that rebuilds silu(gate) * up in the backward (kernels/rebuild.py: the next linear saves it) and
    keeps silu(gate) for SwiGLU's own backward, which runs right after and needs it for d_up: one silu pass over
    [tokens, intermediate] less per layer. Lives in that backward's graph, so nothing stale outlives it."""

    def __init__(self):
        self.silu = None

    def rebuild(self, gate, up):
        self.silu = F.silu(gate)
        return self.silu * up  # the forward's values: silu rounded, then the product

    def take(self):
        silu, self.silu = self.silu, None
        return silu


class SwiGLUTorch(torch.autograd.Function):
    """The reference's exact forward and backward; keeps gate and up only (the reference also keeps silu(gate))."""

    @staticmethod
    def forward(ctx, gate, up, out, shared_silu):
        ctx.save_for_backward(gate, up)
        ctx.shared_silu = shared_silu
        if out is None:
            return F.silu(gate).mul_(up)
        return torch.ops.aten.silu.out(gate, out=out).mul_(up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        silu = ctx.shared_silu.take() if ctx.shared_silu is not None else None
        dgate = dup = None
        if ctx.needs_input_grad[1]:
            dup = (F.silu(gate) if silu is None else silu).mul_(dy)
        if ctx.needs_input_grad[0]:
            dgate = torch.mul(dy, up)
            torch.ops.aten.silu_backward.grad_input(dgate, gate, grad_input=dgate)  # in place: one buffer per grad
        return dgate, dup, None, None


class SwiGLUNative(torch.autograd.Function):
    """Contiguous fp32 CPU tensors: one fused pass forward and one backward (kernels/cpu_fused.c); keeps gate and
    up only."""

    @staticmethod
    def forward(ctx, gate, up, out):
        ctx.save_for_backward(gate, up)
        return native.swiglu_forward(gate, up, out)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dgate, dup = native.swiglu_backward(dy.contiguous(), gate, up)
        return dgate if ctx.needs_input_grad[0] else None, dup if ctx.needs_input_grad[1] else None, None


def swiglu_native(gate, up, out=None):
    """out: as for swiglu_torch."""
    _check(gate, up)
    native.require("swiglu", gate, up)
    return SwiGLUNative.apply(gate, up, out)


def swiglu_torch(gate, up, out=None, shared_silu=None):
    """out: an optional buffer of gate's shape and dtype to write the result into (kernels/rebuild.py);
    shared_silu: the SharedSilu whose `rebuild` recipe rebuilds this output in the backward."""
    _check(gate, up)
    return SwiGLUTorch.apply(gate, up, out, shared_silu)
