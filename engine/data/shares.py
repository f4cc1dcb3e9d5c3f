"""Tokenization split across ranks: each rank tokenizes a contiguous share of the records and writes it beside the
cache; rank 0 joins the shares in rank order into the rows, so the rows are the same for any number of ranks.

The ranks are torch.distributed's (one share in a single process). The shares go through files, which multi-node
runs need on a filesystem every node sees (as the cache and the checkpoints do).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch.distributed as dist
from safetensors.numpy import load_file, save_file

from .examples import Tokenized


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def my_share(count: int, rank: int, world: int) -> slice:
    return slice(count * rank // world, count * (rank + 1) // world)


def from_main(value, world: int):
    """Rank 0's `value` on every rank."""
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value, world: int) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    if world == 1:
        return [value]
    values = [None] * world
    dist.all_gather_object(values, value)
    return values


def barrier(world: int):
    if world > 1:
        dist.barrier()


def share_path(cache_path: Path, rank: int, world: int) -> Path:
    return cache_path.with_name(f".{cache_path.stem}.share-{rank}-of-{world}.safetensors")


def write(path: Path, groups: list[list[Tokenized]]):
    """Groups of examples (one each for CPT and SFT, a pair for DPO) as three flat arrays."""
    examples = [e for group in groups for e in group]
    columns = {"ids": np.concatenate([e.ids for e in examples] or [np.zeros(0)]).astype(np.int32),
               "trainable": np.concatenate([e.trainable for e in examples] or [np.zeros(0)]).astype(np.uint8),
               "lengths": np.array([len(e.ids) for e in examples], dtype=np.int64)}
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    save_file(columns, str(partial))
    os.replace(partial, path)


def read(path: Path, group_size: int) -> list[list[Tokenized]]:
    columns = load_file(str(path))
    bounds = np.cumsum(columns["lengths"])[:-1]
    ids = np.split(columns["ids"].astype(np.int64), bounds) if len(columns["lengths"]) else []
    trainable = np.split(columns["trainable"].astype(bool), bounds) if len(columns["lengths"]) else []
    examples = [Tokenized(i, t) for i, t in zip(ids, trainable)]
    return [examples[i:i + group_size] for i in range(0, len(examples), group_size)]
