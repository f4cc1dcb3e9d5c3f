"""Resume gaps (issue 14.4) on train/cpt.py subprocesses with the tiny model: skipped steps survive a resume, the
checkpoint records the schedule's length and a resume with another max_steps says which cosine it follows, and
ranks that do not share out_dir are stopped at start with one line."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest

from hippocrates.tests.train_helpers import REPO, checkpoint_steps, cpt_args, make_tiny_model, records, run, run_env


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, data_dir):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", data_dir)


def meta(out_dir, step) -> dict:
    return json.loads((out_dir / "checkpoints" / f"step_{step}" / "meta.json").read_text())


def cosine_lr(step, lr, warmup, total, min_ratio):
    """Warmup to lr over `warmup` steps, then half a cosine from lr (first step after warmup) to lr * min_ratio
    (step `total`), flat after it."""
    if step <= warmup:
        return lr * step / warmup
    progress = min(1.0, (step - warmup - 1) / (total - warmup - 1))
    return lr * min_ratio + (lr - lr * min_ratio) * (1 + math.cos(math.pi * progress)) / 2


def test_skipped_steps_are_restored_on_resume(tiny_model, tmp_path):
    """Step 3 is non-finite and skipped, the run dies at step 5; the resumed run's checkpoints still count it."""
    out = tmp_path / "run"
    faults = {"HIPPO_FAULT_NAN_STEP": "3", "HIPPO_FAULT_RAISE": "0:5"}
    died = run("cpt", cpt_args(tiny_model, out, skip_nonfinite="true"), env=run_env(**faults), check=False)
    assert died.returncode != 0 and "step skipped" in died.stdout
    assert checkpoint_steps(out) == [2, 4] and meta(out, 4)["skipped_steps"] == 1

    resumed = run("cpt", cpt_args(tiny_model, out, skip_nonfinite="true", resume="true"))
    assert "resumed from" in resumed.stdout and "1 non-finite steps skipped before" in resumed.stdout
    assert meta(out, 6)["skipped_steps"] == 1
    assert "1 non-finite steps skipped" in resumed.stdout.splitlines()[-1]
    rows = {r["step"]: r for r in records(out)}
    assert [s for s in sorted(rows) if rows[s]["skipped"]] == [3]


def test_resume_with_another_max_steps_logs_and_follows_the_schedule(tiny_model, tmp_path):
    """A 4-step run resumed to 6 steps: by default the cosine of the new length (logged, with the jump); with
    optim.decay_steps=4 the checkpoint's cosine, flat at its end."""
    lr, warmup, min_ratio = 3e-3, 1, 0.1
    first = tmp_path / "first"
    run("cpt", cpt_args(tiny_model, first, max_steps=4))
    assert meta(first, 4)["schedule"] == {"lr": lr, "warmup_steps": warmup, "min_lr_ratio": min_ratio,
                                          "total_steps": 4}
    kept = tmp_path / "kept"
    shutil.copytree(first, kept)

    longer = run("cpt", cpt_args(tiny_model, first, max_steps=6, resume="true"))
    line = next(line for line in longer.stdout.splitlines() if line.startswith("learning-rate schedule"))
    assert "this run's (warmup 1, cosine to step 6), not the checkpoint's (cosine to step 4)" in line
    assert f"step 5 runs at lr {cosine_lr(5, lr, warmup, 6, min_ratio):.3e} instead of " \
           f"{cosine_lr(5, lr, warmup, 4, min_ratio):.3e}" in line
    assert "optim.decay_steps=4 keeps the checkpoint's" in line
    rows = records(first)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in rows[4:]] == pytest.approx([cosine_lr(s, lr, warmup, 6, min_ratio) for s in (5, 6)])
    assert meta(first, 6)["schedule"]["total_steps"] == 6

    same = run("cpt", cpt_args(tiny_model, kept, max_steps=6, resume="true", **{"optim.decay_steps": 4}))
    assert "learning-rate schedule: the checkpoint's (warmup 1, cosine to step 4)" in same.stdout
    assert [r["lr"] for r in records(kept)[4:]] == pytest.approx([lr * min_ratio] * 2)


SHARED_CHECK = """
import sys
from hippocrates.engine import checkpointing, distributed
env = distributed.setup(60)
base, mode = sys.argv[1], sys.argv[2]
out_dir = f"{base}/shared" if mode == "shared" else f"{base}/rank{env.rank}"  # rank-private dirs: two machines
try:
    checkpointing.check_shared_out_dir(out_dir, env)
    print(f"rank {env.rank}: ok", flush=True)
except checkpointing.CheckpointMismatchError as err:
    print(f"rank {env.rank}: error: {err}", flush=True)
distributed.teardown()
"""


@pytest.mark.parametrize("mode", ["shared", "private"])
def test_ranks_that_do_not_share_out_dir_stop_with_one_line(tmp_path, mode):
    script = tmp_path / "check.py"
    script.write_text(SHARED_CHECK)
    (tmp_path / "rank1").mkdir()
    (tmp_path / "rank1" / ".rank0_token").write_text("a token left by an earlier run")  # stale: must not pass
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                             str(script), str(tmp_path), mode], cwd=REPO, env=run_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank "))
    if mode == "shared":
        assert lines == ["rank 0: ok", "rank 1: ok"]
        assert not (tmp_path / "shared" / ".rank0_token").exists()
    else:
        assert len(lines) == 2 and all(": error: out_dir=" in line for line in lines), lines
        assert all("1 of 2 ranks do not see the file rank 0 wrote there" in line for line in lines)
