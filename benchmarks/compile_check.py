"""Compile every Triton kernel of kernels/ (this helper's ops) ahead of time for an H100 (sm_90), with the GPU launch
configurations, without a GPU: catches compile errors (types, loop-carried values, tl.dot shapes, shared memory
over the limit) and shows each kernel's shared memory.

`python benchmarks/compile_check.py` (must run without TRITON_INTERPRET; benchmarks/kernels.py runs it in a
subprocess on CPU-only machines).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import torch  # noqa: E402

from hippocrates.kernels import activation, cross_entropy, flash_attention, lora, rmsnorm, rope  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def _signature(names, types, constexprs):
    sig = dict(zip(names, types))
    sig.update({name: "constexpr" for name in constexprs})
    return sig


def kernel_specs(dtype="bf16"):
    """(label, jit function, signature types in argument order, constexprs, launch options)."""
    ptr = f"*{dtype}"
    specs = [
        ("rmsnorm forward H=4096", rmsnorm._rms_norm_forward_kernel,
         [ptr, ptr, ptr, "*fp32", "i32", "fp32"], dict(BLOCK=4096), dict(num_warps=16)),
        ("rmsnorm backward H=4096", rmsnorm._rms_norm_backward_kernel,
         [ptr, ptr, ptr, "*fp32", ptr, "*fp32", "i32", "i32", "i32"], dict(BLOCK=4096, COMPUTE_DW=True),
         dict(num_warps=16)),
        ("swiglu forward", activation._swiglu_forward_kernel, [ptr, ptr, ptr, "i64"],
         dict(BLOCK=activation.BLOCK), dict(num_warps=4)),
        ("swiglu backward", activation._swiglu_backward_kernel, [ptr, ptr, ptr, ptr, ptr, "i64"],
         dict(BLOCK=activation.BLOCK), dict(num_warps=4)),
        ("rope forward+backward Hq=32 Hkv=8 D=128", rope._rope_kernel,
         [ptr, ptr, ptr, ptr, ptr, ptr] + ["i64"] * 14 + ["i32", "i32", "i32"],
         dict(HALF=64, BLOCK_HQ=32, BLOCK_HK=8, BLOCK_HALF=64, BACKWARD=True), dict(num_warps=4)),
        ("cross-entropy rows V=32000", cross_entropy._cross_entropy_rows_kernel,
         [ptr, "*i64", "*fp32", "*fp32", "i32", "i32"], dict(BLOCK_V=4096, WRITE_GRAD=True, HAS_ROW_SCALE=True),
         dict(num_warps=8)),
    ]
    blocks = dict(BM=64, BN=128, BK=64, BR=16, PRECISION="ieee" if dtype == "fp32" else "tf32")
    specs += [
        ("lora forward r=16", lora._lora_forward_kernel,
         [ptr, ptr, ptr, ptr, ptr, ptr, "fp32", "i32", "i32", "i32", "i32"], blocks,
         dict(num_warps=4, num_stages=3)),
        ("lora backward r=16", lora._lora_backward_kernel,
         [ptr, ptr, ptr, ptr, ptr, ptr, ptr, "*fp32", "*fp32", "fp32", "i32", "i32", "i32", "i32", "i32"],
         dict(blocks, COMPUTE_DA=True, COMPUTE_DB=True), dict(num_warps=4, num_stages=3)),
    ]
    return specs + [spec for head_dim in (32, 64, 96, 128) for spec in attention_specs(dtype, head_dim)]


def attention_specs(dtype, head_dim):
    """The four attention kernels with the launch configurations `kernels.flash_attention` uses on an H100, every
    mask branch on (causal, sliding window, packed segments)."""
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    precision = flash_attention._dot_precision(torch_dtype)
    kernels = [("attention forward", flash_attention._attn_fwd_kernel, "fwd"),
               ("attention backward dK/dV", flash_attention._attn_bwd_dkdv_kernel, "dkdv"),
               ("attention backward dQ", flash_attention._attn_bwd_dq_kernel, "dq")]
    flags = dict(HEAD_DIM=head_dim, BLOCK_D=flash_attention._block_d(head_dim), CAUSAL=True, HAS_WINDOW=True,
                 HAS_SEGMENTS=True, PRECISION=precision)
    specs = []
    for label, fn, name in kernels:
        block_m, block_n, warps, stages = flash_attention._config(name, head_dim, torch.device("cuda"), torch_dtype)
        constexprs = dict(flags, BLOCK_M=block_m, BLOCK_N=block_n)
        specs.append((f"{label} D={head_dim} {block_m}x{block_n}", fn, _attention_types(fn, constexprs, dtype),
                      constexprs, dict(num_warps=warps, num_stages=stages)))
    delta = flash_attention._bwd_delta_kernel
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=64, BLOCK_D=flash_attention._block_d(head_dim))
    specs.append((f"attention backward delta D={head_dim}", delta, _attention_types(delta, constexprs, dtype),
                  constexprs, dict(num_warps=4)))
    return specs


def _attention_types(fn, constexprs, dtype):
    """Argument types by name: tensors in capitals (LSE and DELTA fp32, segment ids int32), scales fp32, ints i32."""
    types = []
    for name in fn.arg_names:
        if name in constexprs:
            continue
        if name in ("LSE", "DELTA"):
            types.append("*fp32")
        elif name.startswith("SEG"):
            types.append("*i32")
        elif name.isupper():
            types.append(f"*{dtype}")
        elif name.endswith("_scale"):
            types.append("fp32")
        else:
            types.append("i32")
    return types


def compile_all(dtypes=("bf16", "fp32")):
    """Rows of (dtype, kernel, shared bytes, error or None)."""
    rows = []
    for dtype in dtypes:
        for label, fn, types, constexprs, options in kernel_specs(dtype):
            runtime_args = [name for name in fn.arg_names if name not in constexprs]
            try:
                source = ASTSource(fn=fn, signature=_signature(runtime_args, types, constexprs), constexprs=constexprs)
                compiled = triton.compile(source, target=TARGET, options=options)
                rows.append((dtype, label, compiled.metadata.shared, None))
            except Exception as err:
                rows.append((dtype, label, None, f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"))
    return rows


def main():
    rows = compile_all()
    print(f"Ahead-of-time compile for {TARGET.backend} sm_{TARGET.arch} (no GPU needed):")
    print(f"  {'dtype':<6}{'kernel':<42}{'shared bytes':>13}  status")
    for dtype, label, shared, error in rows:
        print(f"  {dtype:<6}{label:<42}{shared if shared is not None else '-':>13}  {error or 'ok'}")
    return int(any(row[-1] for row in rows))


if __name__ == "__main__":
    sys.exit(main())
