"""The training variants of every Triton kernel compile for an H100/H200 (sm_90) with the JIT's own specialisation,
without a GPU, and ptxas reports no spill, shared memory under the sm_90 limit and pipelined attention loops
(benchmarks/compile_check.py --quick: bf16, packed documents at head dims 32-128, LoRA ranks 8-128, the other ops).
The whole matrix (plain/causal/window/segments x bf16/fp16, fp32) runs with `python -m
hippocrates.benchmarks.compile_check` or `bench_kernels --full-compile`.

Subprocesses, because the compiler must not see TRITON_INTERPRET. The oldest supported Triton (3.6) is checked
too: pip installs it once into the cache (`HIPPO_CACHE_DIR/triton-3.6.0`, or the folder HIPPO_TRITON_OLD names) and the
check runs with that folder first on PYTHONPATH.
"""
import json
import os
import subprocess
import sys
from pathlib import Path


OLD_TRITON_VERSION = "3.6.0"


def old_triton_dir() -> Path:
    """A `pip install --target` folder holding the oldest supported Triton, made once (atomically) if missing."""
    from hippocrates.models.paths import cache_dir
    target = Path(os.environ.get("HIPPO_TRITON_OLD") or cache_dir() / f"triton-{OLD_TRITON_VERSION}")
    if not (target / "triton").is_dir():
        staging = target.with_name(target.name + f".tmp{os.getpid()}")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
                        "--target", str(staging), f"triton=={OLD_TRITON_VERSION}"], check=True, timeout=900)
        staging.rename(target)
    return target


def run_compile_check(tmp_path, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    out = tmp_path / "rows.json"
    result = subprocess.run([sys.executable, "-m", "hippocrates.benchmarks.compile_check", "--quick", "--jobs", "2",
                             "--json", str(out)], env=env, capture_output=True, text=True, timeout=1500)
    assert out.exists(), result.stderr[-3000:]
    report = json.loads(out.read_text())
    return result, report


def check_rows(result, report):
    rows = report["rows"]
    failed = [f"{r['family']} {r['variant']} {r['kernel']}: {r['errors']}" for r in rows if r["errors"]]
    assert result.returncode == 0 and not failed, "\n".join(failed) or result.stdout[-3000:]
    attention = [r for r in rows if r["family"] == "attention"]
    assert len(attention) == 4 * 4  # head dims 32/64/96/128 x (forward, dK/dV, dQ, delta)
    assert len([r for r in rows if r["family"] == "lora"]) == 4 * 2  # ranks 8/16/64/128 x (forward, backward)
    for r in rows:
        assert r["smem"] is not None and r["smem"] <= 232_448 and r["spills"] == 0 and r["registers"] <= 255
        if r["family"] == "attention" and r["kernel"] != "delta":
            assert r["async_copies"] > 0, f"{r['variant']} {r['kernel']} not pipelined"


def test_training_variants_compile_for_sm90(tmp_path):
    check_rows(*run_compile_check(tmp_path))


def test_training_variants_compile_for_sm90_with_triton_36(tmp_path):
    result, report = run_compile_check(tmp_path, old_triton_dir())
    assert report["triton"].startswith("3.6")
    check_rows(result, report)
