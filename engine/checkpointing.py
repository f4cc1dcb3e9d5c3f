"""Training checkpoints: sharded with torch.distributed.checkpoint, committed atomically, fingerprinted, rotated.

out_dir/checkpoints/step_N/ holds
  *.distcp, .metadata   model weights that train (the adapters, or all for full fine-tuning) and AdamW state
  rng_rank{R}.pt        each rank's torch / CUDA / Python / NumPy RNG states
  meta.json             step, data position, the run's fingerprint (written last)
A save goes to step_N.tmp/ and is renamed to step_N/ once every file is flushed, so a crash mid-save leaves the
previous checkpoints untouched; leftovers of an unfinished save are removed by the next run. The learning-rate
schedule is a function of the step, so `step` is the scheduler's whole state; the data position is the number of
rows consumed, which the step determines as well.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from hippocrates.engine import faults
from hippocrates.engine.distributed import DistEnv, gather_full_state

META_FILE = "meta.json"
STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINABLE_ONLY = StateDictOptions(ignore_frozen_params=True)


class CheckpointMismatchError(ValueError):
    """A checkpoint written by a different model or config; the message says which keys differ."""


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def finished_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, dir) of every committed checkpoint, oldest first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / META_FILE).is_file()]
    return sorted(found)


def remove_unfinished(out_dir: str | Path):
    """Delete step_N.tmp dirs left by a save that never finished (call on rank 0 before training)."""
    root = checkpoint_root(out_dir)
    if root.is_dir():
        for p in root.glob("step_*.tmp"):
            shutil.rmtree(p, ignore_errors=True)


def resolve_resume(resume: bool | str, out_dir: str | Path) -> Path | None:
    """`resume=true`: the latest checkpoint in out_dir (None when there is none yet); a path: that checkpoint."""
    if resume is False or resume in ("", "false", "False", None):
        return None
    if resume is True or str(resume).lower() == "true":
        found = finished_checkpoints(out_dir)
        return found[-1][1] if found else None
    path = Path(str(resume))
    if not (path / META_FILE).is_file():
        raise CheckpointMismatchError(f"resume={resume}: not a finished checkpoint dir (no {META_FILE})")
    return path


def check_fingerprint(path: Path, current: dict):
    saved = json.loads((path / META_FILE).read_text())["fingerprint"]
    current = json.loads(json.dumps(current))  # tuples -> lists, as saved
    differences = [f"{key}: checkpoint has {saved.get(key)!r}, this run has {current.get(key)!r}"
                   for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]
    if differences:
        more = f" (and {len(differences) - 3} more)" if len(differences) > 3 else ""
        raise CheckpointMismatchError(f"{path} was written by a different run: {'; '.join(differences[:3])}{more}")


def save_checkpoint(out_dir: str | Path, step: int, model, optimizer, extra: dict, fingerprint: dict, env: DistEnv,
                    keep_last: int) -> Path:
    """Write step_N.tmp/ on every rank, then rank 0 flushes, renames it to step_N/ and rotates. A collective."""
    final = checkpoint_root(out_dir) / f"step_{step}"
    tmp = final.with_name(final.name + ".tmp")
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    state = {"model": get_model_state_dict(model, options=TRAINABLE_ONLY),
             "optim": get_optimizer_state_dict(model, optimizer, options=TRAINABLE_ONLY)}
    dcp.save(state, checkpoint_id=str(tmp))  # its FileSystemWriter fsyncs each file it writes
    with open(tmp / f"rng_rank{env.rank}.pt", "wb") as f:
        torch.save(rng_states(), f)
        f.flush()
        os.fsync(f.fileno())
    faults.pause_during_save(step)
    dist.barrier()
    if env.is_main:
        meta = {"step": step, "world_size": env.world_size, "fingerprint": fingerprint, **extra}
        _write_synced(tmp / META_FILE, json.dumps(meta, indent=2))
        if final.exists():  # the same step saved by an earlier attempt of this run
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(final.parent)
        for _, old in finished_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: Path, model, optimizer, env: DistEnv) -> dict:
    """Restore the trainable weights, AdamW state and this rank's RNG states; return meta.json."""
    state = {"model": get_model_state_dict(model, options=TRAINABLE_ONLY),
             "optim": get_optimizer_state_dict(model, optimizer, options=TRAINABLE_ONLY)}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"], options=StateDictOptions(ignore_frozen_params=True, strict=False))
    set_optimizer_state_dict(model, optimizer, state["optim"], options=TRAINABLE_ONLY)
    rng_file = path / f"rng_rank{env.rank}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: only dropout would differ
        set_rng_states(torch.load(rng_file, weights_only=True))
    return json.loads((path / META_FILE).read_text())


def rng_states() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:])}


def set_rng_states(states: dict):
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available() and states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    random.setstate(states["python"])
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))


def _write_synced(path: Path, text: str):
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def export_final(model, out_dir: str | Path, lora, tokenizer, base_model: str, env: DistEnv):
    """out_dir/final/ (HF safetensors, adapters merged) and, with LoRA, out_dir/adapter/ (PEFT). A collective."""
    from hippocrates.models import build_model, save_pretrained
    from hippocrates.models.lora import add_lora, peft_state_dict, save_peft_adapter

    full_state = gather_full_state(model)
    if env.is_main:
        plain = build_model(model.config, device="meta")
        if lora is not None:
            add_lora(plain, lora)
        plain.load_state_dict(full_state, assign=True)
        out_dir = Path(out_dir)
        for name in ("final", "adapter"):
            shutil.rmtree(out_dir / f"{name}.tmp", ignore_errors=True)
        save_pretrained(plain, out_dir / "final.tmp", tokenizer=tokenizer)
        _replace_dir(out_dir / "final.tmp", out_dir / "final")
        if lora is not None:
            save_peft_adapter(peft_state_dict(plain), lora, out_dir / "adapter.tmp", base_model=base_model)
            _replace_dir(out_dir / "adapter.tmp", out_dir / "adapter")
    dist.barrier()


def _replace_dir(tmp: Path, final: Path):
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
