"""Training checkpoints: sharded with torch.distributed.checkpoint, committed atomically, fingerprinted, rotated.

out_dir/checkpoints/step_N/ holds
  *.distcp, .metadata   model weights that train (the adapters, or all for full fine-tuning) and AdamW state
  rng_rank{R}.pt        each rank's torch / CUDA / Python / NumPy RNG states
  meta.json             step, data position, skipped non-finite steps, the learning-rate schedule's settings
                        (its length among them), the run's fingerprint (written last)
A save goes to step_N.tmp/ and is renamed to step_N/ once every file is flushed, so a crash mid-save leaves the
previous checkpoints untouched; leftovers of an unfinished save are removed by the next run. The learning-rate
schedule is a function of the step, so `step` is the scheduler's whole state; the data position is the number of
rows consumed, which the step determines as well.

Every rank writes into the dir rank 0 creates and commits, so a run over several machines needs out_dir on a shared
filesystem: `check_shared_out_dir` stops a run at start when the ranks do not see the same out_dir. The waits for
file writes (checkpoints, the final export) run on their own Gloo group, whose timeout grows with the bytes to write
(`io_timeout_s`), so a slow filesystem does not trip the collective timeout meant for stuck ranks.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import uuid
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from safetensors.torch import save_file

from hippocrates.engine import faults
from hippocrates.engine.distributed import DistEnv

META_FILE = "meta.json"
SHARED_DIR_TOKEN = ".rank0_token"
IO_BYTES_PER_S = 100 * 2**20  # a slow network filesystem: the write budget io_timeout_s allows
STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINABLE_ONLY = StateDictOptions(ignore_frozen_params=True)


class CheckpointMismatchError(ValueError):
    """A checkpoint written by a different model or config; the message says which keys differ."""


def check_shared_out_dir(out_dir: str | Path, env: DistEnv):
    """Rank 0 writes a fresh token into out_dir, every rank reads it back: one line of error on every rank when
    some rank does not see it (out_dir is not on a filesystem all ranks share). A collective."""
    out_dir = Path(out_dir)
    token_file = out_dir / SHARED_DIR_TOKEN
    token = uuid.uuid4().hex if env.is_main else None
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_synced(token_file, token)
    box = [token]
    dist.broadcast_object_list(box, src=0)  # also the barrier: rank 0 wrote the file before it broadcasts
    mismatched = torch.tensor([float(not _sees_token(token_file, box[0]))], device=env.device)
    dist.all_reduce(mismatched)
    if env.is_main:
        token_file.unlink(missing_ok=True)
    if mismatched.item():
        raise CheckpointMismatchError(
            f"out_dir={out_dir}: {int(mismatched.item())} of {env.world_size} ranks do not see the file rank 0 wrote "
            f"there; checkpoints and the export need out_dir on a filesystem every rank shares")


def _sees_token(path: Path, token: str, wait_s: float = 5.0) -> bool:
    """Whether `path` holds `token`, read again for a few seconds (a network filesystem's lookup cache may lag)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if path.read_text() == token:
                return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def io_timeout_s(model, timeout_s: float) -> float:
    """The collective timeout plus the time to write the weights and AdamW state at IO_BYTES_PER_S."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    adam_state = sum(2 * p.numel() * 4 for p in model.parameters() if p.requires_grad)
    return timeout_s + (weights + adam_state) / IO_BYTES_PER_S


def io_group(timeout_s: float):
    """A Gloo group over all ranks for the waits around file writes (call on every rank)."""
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


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
                    keep_last: int, group=None) -> Path:
    """Write step_N.tmp/ on every rank, then rank 0 flushes, renames it to step_N/ and rotates. A collective; the
    waits run on `group` (default: the default group)."""
    final = checkpoint_root(out_dir) / f"step_{step}"
    tmp = final.with_name(final.name + ".tmp")
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier(group=group)
    state = {"model": get_model_state_dict(model, options=TRAINABLE_ONLY),
             "optim": get_optimizer_state_dict(model, optimizer, options=TRAINABLE_ONLY)}
    dcp.save(state, checkpoint_id=str(tmp), process_group=group)  # its FileSystemWriter fsyncs each file
    with open(tmp / f"rng_rank{env.rank}.pt", "wb") as f:
        torch.save(rng_states(), f)
        f.flush()
        os.fsync(f.fileno())
    faults.pause_during_save(step)
    dist.barrier(group=group)
    if env.is_main:
        meta = {"step": step, "world_size": env.world_size, "fingerprint": fingerprint, **extra}
        _write_synced(tmp / META_FILE, json.dumps(meta, indent=2))
        if final.exists():  # the same step saved by an earlier attempt of this run
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(final.parent)
        for _, old in finished_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier(group=group)
    return final


def load_checkpoint(path: Path, model, optimizer, env: DistEnv, group=None) -> dict:
    """Restore the trainable weights, AdamW state and this rank's RNG states; return meta.json."""
    state = {"model": get_model_state_dict(model, options=TRAINABLE_ONLY),
             "optim": get_optimizer_state_dict(model, optimizer, options=TRAINABLE_ONLY)}
    dcp.load(state, checkpoint_id=str(path), process_group=group)
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


def _fsync_file(path: Path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def export_final(model, out_dir: str | Path, lora, tokenizer, base_model: str, env: DistEnv, group=None):
    """out_dir/final/ (HF safetensors, adapters merged) and, with LoRA, out_dir/adapter/ (PEFT). A collective.

    No rank holds the whole model. The exported tensors are spread over the ranks by size; each is gathered in
    turn and kept by its rank only, and every rank writes its own shard file (model-0000k-of-0000n.safetensors, or
    model.safetensors on one rank) while rank 0 writes the index, config.json, the tokenizer and the adapter. All of
    it goes to final.tmp/, renamed to final/ once every file is flushed; the waits for the writes run on `group`.
    """
    from hippocrates.models.checkpoint import INDEX_FILE, SINGLE_FILE
    from hippocrates.models.lora import peft_state_dict, save_peft_adapter

    out_dir = Path(out_dir)
    tmp = out_dir / "final.tmp"
    entries = export_entries(model)  # [(HF name, [parameters], lora scale)], the same order on every rank
    owners = balance_by_size([_export_bytes(params) for _, params, _ in entries], env.world_size)
    writers = sorted(set(owners))
    files = {rank: (SINGLE_FILE if len(writers) == 1 else f"model-{i:05d}-of-{len(writers):05d}.safetensors")
             for i, rank in enumerate(writers, 1)}
    if env.is_main:
        for name in ("final", "adapter"):
            shutil.rmtree(out_dir / f"{name}.tmp", ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier(group=group)

    mine = {}
    for (name, params, scale), owner in zip(entries, owners):
        full = [_full_tensor(p) for p in params]  # a collective per parameter
        if owner == env.rank:
            mine[name] = _merged(full, scale).cpu().contiguous()
    adapter = {k: _full_tensor(v).cpu() for k, v in peft_state_dict(model).items()} if lora is not None else {}
    if mine:
        save_file(mine, str(tmp / files[env.rank]), metadata={"format": "pt"})
        _fsync_file(tmp / files[env.rank])
    dist.barrier(group=group)

    if env.is_main:
        if len(writers) > 1:
            weight_map = {name: files[owner] for (name, _, _), owner in zip(entries, owners)}
            total = sum(_export_bytes(params) for _, params, _ in entries)
            _write_synced(tmp / INDEX_FILE, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                       indent=2))
        hf_config = model.config.to_hf()
        hf_config["torch_dtype"] = str(entries[0][1][0].dtype).removeprefix("torch.")  # as save_pretrained
        _write_synced(tmp / "config.json", json.dumps(hf_config, indent=2))
        tokenizer.save(tmp)
        _replace_dir(tmp, out_dir / "final")
        if lora is not None:
            save_peft_adapter(adapter, lora, out_dir / "adapter.tmp", base_model=base_model)
            _replace_dir(out_dir / "adapter.tmp", out_dir / "adapter")
    dist.barrier(group=group)


def export_entries(model) -> list[tuple[str, list, float]]:
    """(HF name, parameters, LoRA scale) of each exported tensor: each Linear's weight (with its adapter A, B, to
    be merged), then every other parameter; a tied head appears once (as the embedding)."""
    from hippocrates.models.transformer import Linear
    entries, taken = [], set()
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            adapter = [module.lora_a, module.lora_b] if module.lora_a is not None else []
            entries.append((f"{name}.weight", [module.weight, *adapter], module.lora_scale))
            taken.add(f"{name}.weight")
    entries += [(name, [p], 0.0) for name, p in model.named_parameters() if "lora_" not in name and name not in taken]
    return entries


def balance_by_size(sizes: list[int], world_size: int) -> list[int]:
    """The rank that writes each tensor: largest first, to the rank with the fewest bytes so far."""
    owners, loads = [0] * len(sizes), [0] * world_size
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        rank = min(range(world_size), key=lambda r: loads[r])
        owners[i] = rank
        loads[rank] += sizes[i]
    return owners


def _export_bytes(params) -> int:
    return params[0].numel() * params[0].element_size()  # a merged weight keeps the base weight's dtype


def _full_tensor(p: torch.Tensor) -> torch.Tensor:
    p = p.detach()
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _merged(full: list[torch.Tensor], lora_scale: float) -> torch.Tensor:
    """A weight, or W + scale * B A by the layer's own merged_weight() when it carries an adapter."""
    if len(full) == 1:
        return full[0]
    from hippocrates.models.transformer import Linear
    return Linear.merged_weight(SimpleNamespace(weight=full[0], lora_a=full[1], lora_b=full[2],
                                                lora_scale=lora_scale))


def _replace_dir(tmp: Path, final: Path):
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
