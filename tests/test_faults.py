"""What goes wrong in long runs, done for real on train/cpt.py subprocesses: SIGKILL in the middle of a checkpoint
save, SIGTERM, a NaN loss, a rank that raises under torchrun, bad data, and code paths that could execute code."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from hippocrates.tests.train_helpers import REPO, checkpoint_steps, cpt_args, launch, losses, make_tiny_model, records, run, run_env


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, data_dir):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", data_dir)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def read_until(proc: subprocess.Popen, pattern: str, timeout: float) -> str:
    """Read the process's output line by line until `pattern` appears; return what was read."""
    seen = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if re.search(pattern, line):
            return "".join(seen)
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"{pattern!r} never appeared:\n{''.join(seen)[-3000:]}")


def test_sigkill_during_a_checkpoint_save_resumes_from_the_previous_one(tiny_model, tmp_path):
    """Two ranks; the save of step 4 is killed (every process, SIGKILL) after its files are written and before
    its commit. step_2 must survive intact, and resuming from it must finish with the uninterrupted run's losses."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    args = {"batch_size": 1}
    run("cpt", cpt_args(tiny_model, full, **args), nproc=2)

    proc = launch("cpt", cpt_args(tiny_model, killed, **args), nproc=2,
                  env=run_env(HIPPO_FAULT_SAVE_PAUSE="4:60"), start_new_session=True)
    try:
        read_until(proc, r"checkpoint step 4: files written, pausing", timeout=240)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert checkpoint_steps(killed) == [2]
    assert (killed / "checkpoints" / "step_4.tmp").is_dir()  # the half-written save, never committed

    resumed = run("cpt", cpt_args(tiny_model, killed, resume="true", **args), nproc=2)
    assert "step_2" in resumed.stdout
    assert not (killed / "checkpoints" / "step_4.tmp").exists()  # cleaned up by the resumed run
    assert checkpoint_steps(killed) == [2, 4, 6]
    assert losses(killed)[6] == losses(full)[6]
    assert losses(killed) == losses(full)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_model, tmp_path):
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    keys = {"checkpoint.save_every": 0}  # the only checkpoints are the one SIGTERM makes and the final one
    run("cpt", cpt_args(tiny_model, full, **keys))
    proc = launch("cpt", cpt_args(tiny_model, stopped, **keys), env=run_env(HIPPO_FAULT_STEP_PAUSE="0.5"))
    try:
        wait_for(lambda: (stopped / "metrics.jsonl").exists() and len(records(stopped)) >= 2, 120, "step 2")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    steps = checkpoint_steps(stopped)
    assert len(steps) == 1 and 2 <= steps[0] < 6, steps
    assert f"SIGTERM received: saved checkpoint step_{steps[0]}" in out
    assert not (stopped / "final").exists()

    run("cpt", cpt_args(tiny_model, stopped, resume="true", **keys))
    assert losses(stopped) == losses(full)
    assert (stopped / "final" / "config.json").is_file()


def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tiny_model, tmp_path):
    out = tmp_path / "nan"
    result = run("cpt", cpt_args(tiny_model, out), env=run_env(HIPPO_FAULT_NAN_STEP="3"), check=False)
    assert result.returncode == 1
    assert "step 3: non-finite loss=nan" in result.stdout and "Traceback" not in result.stdout
    assert "last good checkpoint" in result.stdout and "step_2" in result.stdout
    assert checkpoint_steps(out) == [2]
    assert sorted(losses(out)) == [1, 2]


def test_nan_loss_is_skipped_when_configured(tiny_model, tmp_path):
    out = tmp_path / "skip"
    result = run("cpt", cpt_args(tiny_model, out, skip_nonfinite="true"), env=run_env(HIPPO_FAULT_NAN_STEP="3"))
    assert "step 3: non-finite loss" in result.stdout and "step skipped" in result.stdout
    rows = {r["step"]: r for r in records(out)}
    assert rows[3]["skipped"] is True and all(not rows[s]["skipped"] for s in (1, 2, 4, 5, 6))
    assert (out / "final" / "config.json").is_file()


def test_a_failing_rank_ends_every_process_with_its_error_shown(tiny_model, tmp_path):
    out = tmp_path / "raise"
    started = time.monotonic()
    proc = launch("cpt", cpt_args(tiny_model, out, batch_size=1), nproc=2, env=run_env(HIPPO_FAULT_RAISE="1:3"),
                  start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    assert "injected failure on rank 1 at step 3" in output
    assert elapsed < 60, f"the run took {elapsed:.0f} s to go down"
    leftover = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert not leftover, f"processes of the failed run are still alive: {leftover}"


def test_bad_data_is_one_line_naming_the_file_and_line(tiny_model, tmp_path):
    data = tmp_path / "notes.jsonl"
    data.write_text('{"text": "Aspirin inhibits platelets."}\n{"text": "Warfarin\n')
    result = run("cpt", cpt_args(tiny_model, tmp_path / "out", data=f"{data}:text=text"), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stdout
    assert re.search(rf"error: .*{re.escape(str(data))}, line 2: malformed JSON", result.stdout), result.stdout[-2000:]


def test_bad_config_key_is_one_line(tiny_model, tmp_path):
    result = run("cpt", cpt_args(tiny_model, tmp_path / "out", **{"lora.rnak": 4}), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stdout
    assert "lora.rnak" in result.stdout


def test_no_code_path_can_unpickle_or_run_remote_code():
    """Weights come from safetensors or GGUF only: every torch.load is weights_only=True, nothing passes
    trust_remote_code, and no pickle or eval is used on files."""
    offenders = []
    for path in REPO.glob("*/**/*.py"):
        if path.is_relative_to(REPO / "tests") or ".git" in path.parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if "torch.load(" in code and "weights_only=True" not in code:
                offenders.append(f"{path}:{number}: {line.strip()}")
            if re.search(r"trust_remote_code\s*=\s*True|\bpickle\.loads?\(|(?<![.\w])(eval|exec)\(", code):
                offenders.append(f"{path}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
