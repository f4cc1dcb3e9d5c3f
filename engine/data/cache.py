"""The tokenized rows on disk: `cache_dir()/tokenized/<stage>-<key>.safetensors`, written atomically, mapped to read.

The key hashes everything the rows depend on: each source file's path, size and mtime (a hub dataset only by its
name: clear the cache when one changes), the tokenizer (its ids, chat template and how it encodes and decodes a
probe), the data options, the stage, seq_len and the part. Any change builds new rows; stale files are never read.

The columns (see rows.py) are mapped, not read: every rank on a machine shares one copy in the page cache, and a
batch reads only its rows.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from hippocrates.models.checkpoint import safetensors_header
from hippocrates.models.paths import cache_dir

log = logging.getLogger("hippocrates")

FORMAT_VERSION = 2
PROBE = "Hippocrates: 37.5 °C, naïve T-cells — ¿qué? 漢字 <tag>\n\n  indent\tA1c=6.5%"
NUMPY_DTYPES = {"U8": np.uint8, "U16": np.uint16, "I32": np.int32, "I64": np.int64}


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


def load(path: Path) -> tuple[dict[str, np.ndarray], dict[str, int]] | None:
    """The columns, memory-mapped read-only, and the counts saved with them; None when absent or damaged."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="numpy") as f:  # safetensors checks the file
            counts = json.loads(f.metadata()["counts"])
        entries, data_start = safetensors_header(path)
        columns = {name: np.memmap(path, dtype=NUMPY_DTYPES[entry["dtype"]], mode="r",
                                   offset=data_start + entry["data_offsets"][0], shape=tuple(entry["shape"]))
                   for name, entry in entries.items()}
        return columns, counts
    except Exception as e:  # safetensors raises its own error types for a damaged file: rebuild it
        log.warning("tokenized cache %s is unreadable (%s); rebuilding it", path, str(e).splitlines()[0])
        return None


def save(path: Path, columns: dict[str, np.ndarray], counts: dict[str, int]):
    """The same rows give the same bytes: the counts go into one metadata entry (safetensors writes several in
    no fixed order)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    save_file({name: np.ascontiguousarray(column) for name, column in columns.items()}, str(partial),
              metadata={"counts": json.dumps(counts, sort_keys=True)})
    os.replace(partial, path)
