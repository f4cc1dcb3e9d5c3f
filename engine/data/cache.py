"""The tokenized rows on disk: `cache_dir()/tokenized/<stage>-<key>.safetensors` (int32), written atomically.

The key hashes everything the rows depend on: each source file's path, size and mtime (a hub dataset only by its
name: clear the cache when one changes), the tokenizer (its ids, chat template and how it encodes and decodes a
probe), the data options, the stage, seq_len and the part. Any change builds new rows; stale files are never read.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hippocrates.models.paths import cache_dir

log = logging.getLogger("hippocrates")

FORMAT_VERSION = 1
PROBE = "Hippocrates: 37.5 °C, naïve T-cells — ¿qué? 漢字 <tag>\n\n  indent\tA1c=6.5%"


def tokenizer_fingerprint(tokenizer) -> str:
    step = max(1, tokenizer.vocab_size // 256)
    sample = list(range(0, tokenizer.vocab_size, step))
    described = [type(tokenizer).__name__, tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id,
                 tokenizer.pad_id, getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "chat_template", None),
                 tokenizer.encode(PROBE), [tokenizer.decode([i]) for i in sample]]
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()


def cache_path(stage: str, described: dict) -> Path:
    text = json.dumps({"version": FORMAT_VERSION, **described}, sort_keys=True, default=str)
    key = hashlib.sha256(text.encode()).hexdigest()[:24]
    return cache_dir() / "tokenized" / f"{stage}-{key}.safetensors"


@contextmanager
def exclusive(path: Path):
    """Held while one process looks up and builds `path` (a lock file beside it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name).long() for name in f.keys()}, f.metadata()
    except Exception as e:  # safetensors raises its own error types for a damaged file: rebuild it
        log.warning("tokenized cache %s is unreadable (%s); rebuilding it", path, str(e).splitlines()[0])
        return None


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    save_file({name: t.to(torch.int32).contiguous() for name, t in tensors.items()}, str(partial), metadata=metadata)
    os.replace(partial, path)
