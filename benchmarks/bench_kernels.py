"""All kernel benchmarks in one command: `python -m hippocrates.benchmarks.bench_kernels`.

On a GPU: forward, backward and forward+backward of every op, timed with triton.testing.do_bench (median), with
peak memory, for the Triton kernels against the PyTorch reference (plus scaled_dot_product_attention, flash-attn
and Liger-Kernel where they apply and are installed), over LLaMA-2-7B and Mistral-7B shapes and sequence lengths
512 to 16k (batch 4); attention also in the training layout ([B, T, H, D] views with packed documents) next
to plain causal, LoRA at ranks 16/64/128 against its torch side (what CUDA runs by default). Achieved TFLOP/s
or GB/s sit beside the analytic FLOP and byte counts and the fraction of
the device's peak, measured in the same run (a dense bf16 matmul, a device-to-device copy). The issue's targets
are printed with pass/fail. Results: benchmarks/results/kernels_gpu.csv and kernels_gpu.png.

Without a GPU: the same cases, tiny, run through the Triton interpreter as a correctness sweep (its timings mean
nothing), an ahead-of-time compile of the kernels for sm_90 (benchmarks/compile_check.py; --full-compile for
the whole variant matrix), then each op's CPU
training path (`*_torch`) is compared with its plain reference (time, peak memory,
saved activations): benchmarks/results/kernels_cpu_sweep.csv, kernels_cpu_sides.csv and kernels_cpu_sides.png.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first `import triton`

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm import tqdm  # noqa: E402

from hippocrates.benchmarks import cpu_sides  # noqa: E402
from hippocrates.benchmarks.kernel_cases import (MODELS, TINY_MODELS, ALL_OPS, as_tuple, build_cases, grad_inputs,  # noqa: E402
                                     relative_error)

GPU_SEQS = [512, 1024, 2048, 4096, 8192, 16384]
TARGETS = [  # (op, model, seq, provider, mode, minimum fraction of the device peak)
    ("attention", "llama2-7b", 4096, "triton", "fwd", 0.50),
    ("attention", "llama2-7b", 4096, "triton", "bwd", 0.35),
    ("attention", "llama2-7b/packed", 4096, "triton", "fwd", 0.50),  # the training layout: [B, T, H, D], documents
    ("attention", "llama2-7b/packed", 4096, "triton", "bwd", 0.35),
]
RMSNORM_BANDWIDTH_TARGET = 0.80
CE_MEMORY_TARGET = 0.25


# ---------------------------------------------------------------- device peaks (GPU)

def measure_device_peaks():
    """Dense bf16 matmul TFLOP/s (8192^3) and copy bandwidth GB/s (1 GiB read + 1 GiB written), measured now."""
    from triton.testing import do_bench
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    matmul_ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    src = torch.empty(2 ** 29, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    del a, b, src, dst
    torch.cuda.empty_cache()
    return {"flop": 2 * n ** 3 / matmul_ms * 1e-9, "byte": 2 * 2 ** 30 / copy_ms * 1e-6}  # TFLOP/s, GB/s


# ---------------------------------------------------------------- one case

def _upstream(outs):
    return [torch.randn_like(o) if o.is_floating_point() else None for o in outs]


def _backward(outs, wanted, upstream):
    return torch.autograd.grad(outs, wanted, upstream, retain_graph=True)


def check_case(case):
    """Every provider's output and gradients against the case's reference provider: max relative errors."""
    inputs = case.make_inputs()
    wanted = grad_inputs(inputs)
    ref_outs = as_tuple(case.providers[case.reference](*inputs))
    upstream = _upstream(ref_outs)
    ref_grads = _backward(ref_outs, wanted, upstream)
    errors = {}
    for name, fn in case.providers.items():
        if name == case.reference:
            continue
        try:
            outs = as_tuple(fn(*inputs))
            grads = _backward(outs, wanted, upstream)
            errors[name] = max([relative_error(o, r) for o, r in zip(outs, ref_outs)]
                               + [relative_error(g, r) for g, r in zip(grads, ref_grads)])
        except Exception as err:  # an optional provider with another API, an unsupported shape
            errors[name] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
    return errors


def _cpu_time_ms(fn):
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def time_case(case, provider, bench):
    """ms of forward, backward, forward+backward, and the peak memory (MiB, GPU only) of forward+backward."""
    inputs = case.make_inputs()
    fn = case.providers[provider]
    wanted = grad_inputs(inputs)
    outs = as_tuple(fn(*inputs))
    upstream = _upstream(outs)
    fwd = bench(lambda: fn(*inputs))
    bwd = bench(lambda: _backward(outs, wanted, upstream))
    del outs
    both = bench(lambda: torch.autograd.grad(as_tuple(fn(*inputs)), wanted, upstream))
    peak = None
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.autograd.grad(as_tuple(fn(*inputs)), wanted, upstream)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return fwd, bwd, both, peak


def rows_for_case(case, bench, peaks, errors):
    rows = []
    for provider in case.providers:
        row = dict(op=case.op, model=case.model, seq=case.seq, shape=case.shape, provider=provider, unit=case.unit,
                   cost_fwd=case.cost_forward, cost_bwd=case.cost_backward, error=errors.get(provider, 0.0))
        try:
            fwd, bwd, both, peak = time_case(case, provider, bench)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append(dict(row, status="OOM"))
            continue
        except Exception as err:
            rows.append(dict(row, status=f"error: {type(err).__name__}"))
            continue
        scale = 1e-9 if case.unit == "flop" else 1e-6  # cost per ms -> TFLOP/s or GB/s
        for mode, ms, cost in [("fwd", fwd, case.cost_forward), ("bwd", bwd, case.cost_backward),
                               ("fwd+bwd", both, case.cost_forward + case.cost_backward)]:
            rate = cost / ms * scale
            rows.append(dict(row, status="ok", mode=mode, ms=ms, rate=rate, peak_mb=peak,
                             fraction=rate / peaks[case.unit] if peaks else None))
    return rows


# ---------------------------------------------------------------- tables, targets, files

def print_table(rows, peaks):
    unit = {"flop": "TFLOP/s", "byte": "GB/s"}
    header = f"{'op':<14}{'model':<13}{'seq':>6}  {'provider':<11}{'mode':<8}{'ms':>10}{'rate':>10} {'':<8}" \
             f"{'of peak':>8}{'peak MiB':>10}  {'max rel err':<12}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if r.get("status") != "ok":
            print(f"{r['op']:<14}{r['model']:<13}{r['seq']:>6}  {r['provider']:<11}{r.get('status')}")
            continue
        fraction = f"{100 * r['fraction']:.0f}%" if r.get("fraction") is not None else "-"
        peak = f"{r['peak_mb']:.0f}" if r.get("peak_mb") is not None else "-"
        error = r["error"] if isinstance(r["error"], str) else f"{r['error']:.2e}"
        print(f"{r['op']:<14}{r['model']:<13}{r['seq']:>6}  {r['provider']:<11}{r['mode']:<8}{r['ms']:>10.3f}"
              f"{r['rate']:>10.2f} {unit[r['unit']]:<8}{fraction:>8}{peak:>10}  {error:<12}")


def check_targets(rows, peaks):
    ok = {(r["op"], r["model"], r["seq"], r["provider"], r["mode"]): r for r in rows if r.get("status") == "ok"}
    results = []
    for op, model, seq, provider, mode, minimum in TARGETS:
        r = ok.get((op, model, seq, provider, mode))
        got = r["fraction"] if r else None
        results.append((f"{op} {mode} {model} seq {seq} (D=128, causal) >= {minimum:.0%} of bf16 matmul "
                        f"({peaks['flop']:.0f} TFLOP/s)", got, got is not None and got >= minimum))
    for key, r in sorted(ok.items(), key=str):
        if r["op"] == "lora" and r["provider"] == "triton" and r["mode"] == "fwd+bwd":
            torch_side = ok.get((key[0], key[1], key[2], "torch", "fwd+bwd"))
            if torch_side:  # informational: CUDA runs the torch side unless the kernel is faster
                print(f"  lora {key[1]} seq {key[2]}: Triton kernel {r['ms']:.3f} ms, torch side "
                      f"{torch_side['ms']:.3f} ms ({torch_side['ms'] / r['ms']:.2f}x)")
    for mode in ("fwd", "bwd"):
        fractions = [r["fraction"] for r in ok.values() if r["op"] == "rmsnorm" and r["provider"] == "triton"
                     and r["mode"] == mode]
        worst = min(fractions) if fractions else None
        results.append((f"rmsnorm {mode} >= {RMSNORM_BANDWIDTH_TARGET:.0%} of copy bandwidth ({peaks['byte']:.0f} "
                        f"GB/s), worst shape", worst, worst is not None and worst >= RMSNORM_BANDWIDTH_TARGET))
    ratios = []
    for key, r in ok.items():
        if r["op"] == "cross_entropy" and r["provider"] == "triton" and r["mode"] == "fwd+bwd":
            ref = ok.get((key[0], key[1], key[2], "reference", "fwd+bwd"))
            if ref and ref["peak_mb"]:
                ratios.append(r["peak_mb"] / ref["peak_mb"])
    worst = max(ratios) if ratios else None
    results.append((f"fused linear cross-entropy peak memory <= {CE_MEMORY_TARGET:.0%} of unfused, worst shape",
                    worst, worst is not None and worst <= CE_MEMORY_TARGET))
    print("\nTargets (H100, bf16):")
    for text, got, passed in results:
        shown = "not measured" if got is None else f"{got:.1%}"
        print(f"  [{'PASS' if passed else 'FAIL'}] {text}: {shown}")
    return results


def write_csv(rows, path):
    keys = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


def plot_gpu(rows, peaks, path):
    """Per op: % of the device peak for fwd, bwd, fwd+bwd, and the fwd+bwd peak memory, against sequence length."""
    ops = list(dict.fromkeys(r["op"] for r in rows))
    panels = [("fwd", "fraction"), ("bwd", "fraction"), ("fwd+bwd", "fraction"), ("fwd+bwd", "peak_mb")]
    fig, axes = plt.subplots(len(ops), len(panels), figsize=(20, 3.6 * len(ops)), squeeze=False)
    for i, op in enumerate(ops):
        unit = next(r["unit"] for r in rows if r["op"] == op)
        for j, (mode, key) in enumerate(panels):
            ax = axes[i][j]
            lines = {}
            for r in rows:
                if r["op"] == op and r.get("mode") == mode and r.get("status") == "ok" and r.get(key) is not None:
                    value = 100 * r[key] if key == "fraction" else r[key]
                    lines.setdefault(f"{r['provider']} {r['model']}", []).append((r["seq"], value))
            for label, points in sorted(lines.items()):
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{op} {mode}" + (" peak memory" if key == "peak_mb" else ""))
            ax.set_xlabel("sequence length (batch 4)")
            if key == "peak_mb":
                ax.set_yscale("log")
                ax.set_ylabel("MiB above inputs")
            else:
                ax.set_ylabel("% of bf16 matmul peak" if unit == "flop" else "% of copy bandwidth")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"Kernels on {torch.cuda.get_device_name()}: bf16 matmul {peaks['flop']:.0f} TFLOP/s, "
                 f"copy {peaks['byte']:.0f} GB/s (measured in this run)")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def plot_cpu_sides(rows, path):
    ops = list(dict.fromkeys(r["op"] for r in rows))
    get = {(r["op"], r["side"]): r for r in rows}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (key, title) in zip(axes, [("ms", "forward + backward (ms)"), ("peak_mb", "peak RSS above inputs (MiB)"),
                                       ("saved_mb", "saved for backward (MiB)")]):
        x = range(len(ops))
        ax.bar([i - 0.2 for i in x], [get[(op, "reference")][key] for op in ops], 0.4, label="*_reference")
        ax.bar([i + 0.2 for i in x], [get[(op, "torch")][key] for op in ops], 0.4, label="*_torch")
        ax.set_xticks(list(x), ops, rotation=20)
        ax.set_title(title)
        ax.legend()
    fig.suptitle("CPU training paths, SmolLM2-135M shapes (batch 4 x 512, fp32, 2 threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


# ---------------------------------------------------------------- the two modes

def run_gpu(args, out_dir):
    from triton.testing import do_bench
    peaks = measure_device_peaks()
    print(f"device: {torch.cuda.get_device_name()}; measured peaks: bf16 matmul {peaks['flop']:.0f} TFLOP/s, "
          f"copy {peaks['byte']:.0f} GB/s")
    cases = build_cases(args.ops, MODELS, args.seqs or GPU_SEQS, 4, torch.bfloat16, "cuda")
    bench = lambda fn: do_bench(fn, warmup=10, rep=50, return_mode="median")  # noqa: E731
    rows = []
    for case in tqdm(cases, desc="kernel benchmarks"):
        try:
            errors = check_case(case)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            errors = {}
        rows += rows_for_case(case, bench, peaks, errors)
        torch.cuda.empty_cache()
    print_table(rows, peaks)
    print("Rates use the analytic useful work of each op (FLOPs: attention 4/10 N D per visible pair, LoRA and the LM "
          "head their matmuls; bytes: one read of every input and one write of every output). The fused linear "
          "cross-entropy does its backward work inside the forward, so compare its fwd+bwd row.")
    check_targets(rows, peaks)
    write_csv(rows, out_dir / "kernels_gpu.csv")
    plot_gpu(rows, peaks, out_dir / "kernels_gpu.png")


def run_cpu(args, out_dir):
    print("No CUDA device: the Triton kernels run in the interpreter (TRITON_INTERPRET=1) as a correctness sweep "
          "over tiny shapes.\nTHE INTERPRETER TIMINGS BELOW MEAN NOTHING about GPU speed.\n")
    rows = []
    for dtype in (torch.float32, torch.float16):
        cases = build_cases(args.ops, TINY_MODELS, args.seqs or [16, 40], 2, dtype, "cpu")
        for case in tqdm(cases, desc=f"interpreter sweep {str(dtype)[6:]}"):
            for provider, error in check_case(case).items():
                passed = isinstance(error, float) and error <= (2e-5 if dtype == torch.float32 else 2e-2)
                rows.append(dict(op=case.op, model=case.model, dtype=str(dtype)[6:], shape=case.shape,
                                 provider=provider, max_rel_error=error, ms_meaningless=_cpu_time_ms(
                                     lambda c=case, p=provider: _run_once(c, p)), passed=passed))
    print(f"{'op':<14}{'model':<14}{'dtype':<9}{'provider':<11}{'max rel err':>13}  {'ok':<5}shape")
    for r in rows:
        error = r["max_rel_error"] if isinstance(r["max_rel_error"], str) else f"{r['max_rel_error']:.2e}"
        print(f"{r['op']:<14}{r['model']:<14}{r['dtype']:<9}{r['provider']:<11}{error:>13}  "
              f"{'yes' if r['passed'] else 'NO':<5}{r['shape']}")
    failed = sum(not r["passed"] for r in rows)
    print(f"\ninterpreter sweep: {len(rows) - failed}/{len(rows)} provider checks within tolerance "
          f"(fp32 2e-5, fp16 2e-2 relative to the reference's max)")
    write_csv(rows, out_dir / "kernels_cpu_sweep.csv")
    print()
    if not args.compile_check:
        return failed
    compile_args = [] if args.full_compile else ["--quick"]
    compiled = subprocess.run([sys.executable, "-m", "hippocrates.benchmarks.compile_check", *compile_args],
                              capture_output=True, text=True,
                              env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    print(compiled.stdout.rstrip() or compiled.stderr.strip().splitlines()[-1])
    failed += compiled.returncode != 0
    if args.skip_cpu_sides:
        return failed
    print("\nCPU training paths: *_torch (custom autograd) vs *_reference (plain autograd), forward + backward.\n"
          "Timings are real CPU timings but noisy when other processes share the 2 cores.")
    side_ops = [op for op in cpu_sides.OPS if op in args.ops or (op == "model_step" and args.model_step)]
    sides = cpu_sides.compare_sides(side_ops, repeats=args.repeats, progress=lambda jobs: tqdm(jobs, desc="cpu sides"))
    get = {(r["op"], r["side"]): r for r in sides}
    print(f"\n(time: best of {args.repeats} alternating runs; peak RSS above the inputs and saved activations in MiB)\n"
          f"{'op':<14}{'ref ms':>9}{'torch ms':>10}{'speedup':>9}{'ref peak':>10}{'torch peak':>11}{'ratio':>7}"
          f"{'ref saved':>11}{'torch saved':>12}  shape")
    for op in side_ops:
        ref, ours = get[(op, "reference")], get[(op, "torch")]
        print(f"{op:<14}{ref['ms']:>9.1f}{ours['ms']:>10.1f}{ref['ms'] / ours['ms']:>8.2f}x{ref['peak_mb']:>10.0f}"
              f"{ours['peak_mb']:>11.0f}{ours['peak_mb'] / max(ref['peak_mb'], 1e-9):>7.2f}{ref['saved_mb']:>11.1f}"
              f"{ours['saved_mb']:>12.1f}  {ref['shape']}")
    write_csv(sides, out_dir / "kernels_cpu_sides.csv")
    plot_cpu_sides(sides, out_dir / "kernels_cpu_sides.png")
    return failed


def _run_once(case, provider):
    inputs = case.make_inputs()
    outs = as_tuple(case.providers[provider](*inputs))
    torch.autograd.grad(outs, grad_inputs(inputs), _upstream(outs))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default=",".join(ALL_OPS), help="comma-separated subset of " + ",".join(ALL_OPS))
    parser.add_argument("--seqs", default="", help="comma-separated sequence lengths (default: 512..16384 on GPU)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--repeats", type=int, default=5, help="CPU side comparison: timed repeats per case")
    parser.add_argument("--skip-cpu-sides", action="store_true", help="CPU: only the interpreter sweep")
    parser.add_argument("--no-compile-check", dest="compile_check", action="store_false",
                        help="CPU: leave out the sm_90 compile check (and the CPU sides)")
    parser.add_argument("--full-compile", action="store_true",
                        help="CPU: the whole sm_90 compile matrix (slow) instead of the bf16 training variants")
    parser.add_argument("--no-model-step", dest="model_step", action="store_false",
                        help="CPU sides: leave out the whole-model LoRA step")
    args = parser.parse_args(argv)
    args.ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = [op for op in args.ops if op not in ALL_OPS]
    if unknown:
        parser.error(f"--ops: unknown {unknown}; choose from {list(ALL_OPS)}")
    args.seqs = [int(s) for s in args.seqs.split(",") if s.strip()]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if torch.cuda.is_available():
        run_gpu(args, out_dir)
        return 0
    return 1 if run_cpu(args, out_dir) else 0


if __name__ == "__main__":
    sys.exit(main())
