"""benchmarks/gpu_check.sh --cpu: every section of the first-GPU check runs at toy size on the CPU and writes its
results (so the script cannot rot before a GPU runs it)."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HIPPO_DATA_DIR", ROOT.parent / "shared" / "data"))
TOKENIZER = Path.home() / ".cache" / "hippocrates" / "smollm2" / "SmolLM2-135M-Instruct"


@pytest.mark.skipif(not (DATA / "corpus" / "medquad_qa.jsonl").exists()
                    or not (TOKENIZER / "tokenizer.json").exists(), reason="needs the shared data and the fetched SmolLM2 tokenizer (python -m hippocrates.models.fetch)")
def test_gpu_check_cpu_mode_runs_every_section(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(HIPPO_SOURCE_DATA=str(DATA), HIPPO_TOKENIZER_DIR=str(TOKENIZER), PYTHON=shutil.which("python") or "")
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
