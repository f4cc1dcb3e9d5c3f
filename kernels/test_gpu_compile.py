"""Every Triton kernel compiles for an H100 (sm_90) with its GPU launch configuration, in bf16 and fp32, without a
GPU: type errors, bad loop-carried values, tl.dot shapes or shared memory over the limit fail here rather than on
the first GPU run. A subprocess, because the compiler must not see TRITON_INTERPRET."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_check.py")], env=env,
                            capture_output=True, text=True, timeout=900)
    rows = [line for line in result.stdout.splitlines() if line.startswith("  bf16") or line.startswith("  fp32")]
    failed = [line for line in rows if not line.endswith(" ok")]
    assert result.returncode == 0 and not failed, "\n".join(failed) or result.stderr[-3000:]
    attention = [line for line in rows if "attention" in line]
    assert len(attention) == 2 * 4 * 4  # 2 dtypes x head dims 32/64/96/128 x (forward, dK/dV, dQ, delta)
    assert len(rows) == len(attention) + 2 * 8
