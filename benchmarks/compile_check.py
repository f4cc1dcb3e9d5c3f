"""Compile every Triton kernel variant ahead of time for an H100/H200 (sm_90) exactly as the JIT would, without a GPU,
and read its resources from ptxas.

- Arguments: each kernel is launched (on paper) with the argument list the host code builds for a training shape
  (`flash_attention.forward_launch` / `backward_launches`, `lora.forward_launch` / `backward_launch`; the other ops
  with the arguments their call sites pass). They go through the JIT's own binder and `_pack_args`, so the
  signature, the int == 1 constants and the divisibility-by-16 hints on pointers and ints are the JIT's.
- Resources: shared memory from the compiled metadata (dynamic shared memory, what the launch asks for);
  registers and spills from Triton's bundled `ptxas -v --gpu-name sm_90a` on the PTX (Triton itself fills in
  registers only when a GPU loads the kernel).
- Pipelining: the number of asynchronous copies in the PTX (cp.async, cp.async.bulk, TMA); an attention main
  kernel without them runs its loops unpipelined.
- Fails on: a compile error, shared memory > 232,448 B (the sm_90 per-block limit), any spill in a 16-bit variant,
  an unpipelined 16-bit attention main kernel.

`python -m hippocrates.benchmarks.compile_check [--jobs N] [--json FILE] [--quick]` (TRITON_INTERPRET is ignored;
run it with another Triton through PYTHONPATH, e.g. PYTHONPATH=/work/triton36).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 232_448  # bytes of shared memory one block may use on sm_90
PTXAS = get_ptxas(TARGET.arch).path  # the ptxas this Triton compiles sm_90 with (its bundled one)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Head dim -> (query heads, KV heads) of a model that uses it: SmolLM2-135M (64), Mistral/LLaMA-8B (128),
# Phi-3-mini (96), a small GQA model (32).
ATTENTION_HEADS = {32: (16, 4), 64: (9, 3), 96: (32, 32), 128: (32, 8)}
MASKS = {"plain": (False, None, False), "causal": (True, None, False), "window": (True, 512, False),
         "segments": (True, None, True)}
LORA_RANKS = (8, 16, 64, 128)


def compile_like_jit(kernel, args, options):
    """triton.compile with the specialisation `kernel[grid](*args, **options)` would get on an sm_90 device."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, opts = binder(*args, **options)
    opts, signature, constexprs, attrs = kernel._pack_args(backend, options, bound, specialization, opts)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=TARGET, options=opts.__dict__)


def ptxas_resources(ptx):
    """(registers, spill bytes stored + loaded) from `ptxas -v` on the PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        report = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", str(path), "-o", str(Path(tmp) / "k.o")],
                                capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    return registers, spills


def async_copies(ptx):
    return len(re.findall(r"^\s*cp\.async\.(?!commit|wait)", ptx, flags=re.M))


# ------------------------------------------------------------------------------------------------ the variants
def _attention_launches(head_dim, mask, dtype):
    from hippocrates.kernels import flash_attention as fa
    causal, window, segmented = MASKS[mask]
    n_heads, n_kv_heads = ATTENTION_HEADS[head_dim]
    batch, t = 2, 2048
    dt = DTYPES[dtype]

    def heads(h):  # the model's layout: a [B, T, H, D] projection viewed as [B, H, T, D]
        return torch.empty(batch, t, h, head_dim, dtype=dt).transpose(1, 2)

    q, k, v, o, do, dq = heads(n_heads), heads(n_kv_heads), heads(n_kv_heads), heads(n_heads), heads(n_heads), \
        heads(n_heads)
    ids = torch.arange(t).div(700, rounding_mode="floor").expand(batch, t) if segmented else None  # 3 documents
    segments = fa._SegmentRanges(ids, t, t, "cpu")
    lse, delta = torch.empty(batch, n_heads, t), torch.empty(batch, n_heads, t)
    dk, dv = fa.dkdv_outputs(k, n_heads, gpu=True)
    scale = head_dim ** -0.5
    fwd = fa.forward_launch(q, k, v, o, lse, segments, causal, window, scale, gpu=True)
    delta_launch, dkdv, dq_launch = fa.backward_launches(q, k, v, o, lse, do, delta, dq, dk, dv, segments, causal,
                                                         window, scale, gpu=True)
    return [("forward", fwd), ("dK/dV", dkdv), ("dQ", dq_launch), ("delta", delta_launch)]


def _lora_launches(rank, dtype):
    from hippocrates.kernels import lora
    m, k, n = 4096, 2048, 2048
    dt = DTYPES[dtype]
    x, w, a, b = torch.empty(m, k, dtype=dt), torch.empty(n, k, dtype=dt), torch.empty(rank, k, dtype=dt), \
        torch.empty(n, rank, dtype=dt)
    y, xa = torch.empty(m, n, dtype=dt), torch.empty(m, rank, dtype=dt)
    fwd = lora.forward_launch(x, w, a, b, y, xa, 2.0, gpu=True)
    bwd = lora.backward_launch(torch.empty(m, n, dtype=dt), x, w, a, b, xa, torch.empty_like(x), 2.0, True, True,
                               gpu=True, programs=528)[0]
    return [("forward", fwd), ("backward", bwd)]


def _other_launches(dtype):
    """The elementwise/row kernels, with the arguments their call sites pass (training shapes)."""
    from hippocrates.kernels import activation, cross_entropy, rmsnorm, rope
    dt = DTYPES[dtype]
    rows, hidden, vocab = 4096, 2048, 49152
    x, w = torch.empty(rows, hidden, dtype=dt), torch.empty(hidden, dtype=dt)
    rstd = torch.empty(rows)
    launches = [
        ("rmsnorm forward", (rmsnorm._rms_norm_forward_kernel, None,
                             (x, w, torch.empty_like(x), rstd, hidden, 1e-5), dict(BLOCK=hidden, num_warps=8))),
        ("rmsnorm backward", (rmsnorm._rms_norm_backward_kernel, None,
                              (x, x, w, rstd, torch.empty_like(x), torch.empty(264, hidden), rows, hidden, 16),
                              dict(BLOCK=hidden, COMPUTE_DW=True, num_warps=8))),
        ("swiglu forward", (activation._swiglu_forward_kernel, None, (x, x, torch.empty_like(x), x.numel()),
                            dict(BLOCK=activation.BLOCK, num_warps=4))),
        ("swiglu backward", (activation._swiglu_backward_kernel, None,
                             (x, x, x, torch.empty_like(x), torch.empty_like(x), x.numel()),
                             dict(BLOCK=activation.BLOCK, num_warps=4))),
    ]
    b, t, hq, hk, d = 2, 2048, 32, 8, 128
    q, k = torch.empty(b, t, hq, d, dtype=dt).transpose(1, 2), torch.empty(b, t, hk, d, dtype=dt).transpose(1, 2)
    cos = torch.empty(b, t, d, dtype=dt)
    launches.append(("rope", (rope._rope_kernel, None, (
        q, k, q, k, cos, cos, *q.stride()[:3], *k.stride()[:3], *q.stride()[:3], *k.stride()[:3], cos.stride(0),
        cos.stride(1), t, hq, hk), dict(HALF=d // 2, BLOCK_HQ=hq, BLOCK_HK=hk, BLOCK_HALF=d // 2, BACKWARD=True,
                                        num_warps=4))))
    logits = torch.empty(1024, vocab, dtype=dt)
    launches.append(("cross-entropy rows", (cross_entropy._cross_entropy_rows_kernel, None, (
        logits, torch.empty(1024, dtype=torch.long), torch.empty(1024), torch.empty(1024), vocab, -100),
        dict(BLOCK_V=4096, WRITE_GRAD=True, HAS_ROW_SCALE=True, num_warps=8))))
    return launches


def variants(quick=False, head_dims=tuple(ATTENTION_HEADS)):
    """(family, dtype, parameter) triples; each is compiled in one worker."""
    dtypes = ("bf16", "fp16")
    out = [("attention", dt, (d, mask)) for dt in dtypes for d in head_dims for mask in MASKS]
    out += [("attention", "fp32", (d, "segments")) for d in head_dims]
    out += [("lora", dt, rank) for dt in dtypes for rank in LORA_RANKS]
    out += [("other", dt, None) for dt in dtypes]
    if quick:  # the training variants only: packed documents, bf16
        out = [v for v in out if v[1] == "bf16" and (v[0] != "attention" or v[2][1] == "segments")]
    return out


def check_variant(variant):
    """Rows {family, dtype, variant, kernel, smem, registers, spills, async_copies, errors}."""
    family, dtype, param = variant
    if family == "attention":
        launches, label = _attention_launches(*param, dtype), f"D={param[0]} {param[1]}"
    elif family == "lora":
        launches, label = _lora_launches(param, dtype), f"r={param}"
    else:
        launches, label = _other_launches(dtype), ""
    rows = []
    for name, (kernel, _grid, args, options) in launches:
        row = dict(family=family, dtype=dtype, variant=label, kernel=name, smem=None, registers=None, spills=None,
                   async_copies=None, warps=options.get("num_warps", 4), stages=options.get("num_stages"),
                   errors=[])
        try:
            compiled = compile_like_jit(kernel, args, options)
            ptx = compiled.asm["ptx"]
            row["smem"] = compiled.metadata.shared
            row["registers"], row["spills"] = ptxas_resources(ptx)
            row["async_copies"] = async_copies(ptx)
        except Exception as err:  # a compile error is a result of the check, reported in its row
            row["errors"].append(f"{type(err).__name__}: {str(err).strip().splitlines()[0][:160]}")
        rows.append(_judge(row))
    return rows


def _judge(row):
    if row["smem"] is not None and row["smem"] > SMEM_LIMIT:
        row["errors"].append(f"shared memory {row['smem']} B > {SMEM_LIMIT} B")
    if row["spills"] and row["dtype"] != "fp32":
        row["errors"].append(f"{row['spills']} B of register spills")
    main_attention = row["family"] == "attention" and row["kernel"] != "delta"
    if main_attention and row["dtype"] != "fp32" and row["async_copies"] == 0:
        row["errors"].append("main loops not pipelined (no async copies)")
    return row


def run(jobs=2, quick=False, head_dims=tuple(ATTENTION_HEADS), families=("attention", "lora", "other")):
    todo = [v for v in variants(quick, head_dims) if v[0] in families]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(check_variant, todo))
    else:
        results = [check_variant(v) for v in todo]
    return [row for rows in results for row in rows]


def print_table(rows):
    print(f"sm_{TARGET.arch} ahead-of-time compile, Triton {triton.__version__}, JIT specialisation, ptxas -v:")
    print(f"  {'dtype':<5} {'family':<9} {'variant':<15} {'kernel':<18} {'warps':>5} {'stages':>6} {'smem B':>8} "
          f"{'regs':>5} {'spill B':>7} {'async':>6}  status")
    for r in rows:
        print(f"  {r['dtype']:<5} {r['family']:<9} {r['variant']:<15} {r['kernel']:<18} {r['warps']:>5} "
              f"{r['stages'] if r['stages'] is not None else '-':>6} {r['smem'] if r['smem'] is not None else '-':>8} "
              f"{r['registers'] if r['registers'] is not None else '-':>5} "
              f"{r['spills'] if r['spills'] is not None else '-':>7} "
              f"{r['async_copies'] if r['async_copies'] is not None else '-':>6}  {'; '.join(r['errors']) or 'ok'}")
    print(summary(rows))


def summary(rows):
    """One line per family and dtype: max shared memory, spilling kernels, pipelined main kernels."""
    lines = [f"summary (Triton {triton.__version__}):"]
    for family in ("attention", "lora", "other"):
        for dtype in DTYPES:
            group = [r for r in rows if r["family"] == family and r["dtype"] == dtype]
            if not group:
                continue
            smem = max((r["smem"] or 0) for r in group)
            spilling = [f"{r['variant']} {r['kernel']}" for r in group if r["spills"]]
            loops = [r for r in group if r["kernel"] != "delta" and r["async_copies"] is not None]
            piped = sum(1 for r in loops if r["async_copies"] > 0)
            failed = sum(1 for r in group if r["errors"])
            lines.append(f"  {family:<9} {dtype:<5} kernels {len(group):>3}  max smem {smem:>7} B  spills "
                         f"{len(spilling)} {spilling[:3] if spilling else ''}  pipelined {piped}/{len(loops)}  "
                         f"failed {failed}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--quick", action="store_true", help="bf16 training variants only")
    parser.add_argument("--head-dims", default=",".join(map(str, ATTENTION_HEADS)), help="attention head dims")
    parser.add_argument("--families", default="attention,lora,other")
    args = parser.parse_args(argv)
    rows = run(args.jobs, args.quick, tuple(int(d) for d in args.head_dims.split(",")), args.families.split(","))
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(triton=triton.__version__, rows=rows), indent=1))
    return int(any(r["errors"] for r in rows))


if __name__ == "__main__":
    sys.exit(main())
