"""Token ids -> fixed-length rows of T tokens: CPT packing, SFT rows (padded or packed), DPO pairs.

A row is stored as two columns, 3 bytes per token with a vocabulary of up to 65,536 ids (5 above it):
- `input_ids` [N, T] uint16 (int32 for larger vocabularies);
- `flags` [N, T] uint8: TARGET when the label of the position is the next token, SEGMENT_START where a document
  (example, or the padding at the end of a row) begins.
`expand` derives the batch the model and the loss read (int64 input_ids, labels, segment_ids):
- labels[t] is the target of the prediction made at position t: the next token of the row where TARGET is set, the
  first token of the next row at the last position (a CPT document cut across rows), else -100;
- segment ids number the documents of a row 0, 1, 2, ... in order. The model restarts positions at each segment
  start, so a CPT document that continues from the previous row starts at position 0 again in its new row.
"""
from __future__ import annotations

import numpy as np
import torch

from .examples import Tokenized

IGNORE_INDEX = -100
TARGET = 1
SEGMENT_START = 2


def id_dtype(max_id: int) -> type:
    return np.uint16 if max_id < 2**16 else np.int32


def cpt_rows(documents: list[Tokenized], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Documents concatenated into one stream cut into rows of seq_len, the last row padded. Every next-token pair
    within a document is a target (also the pair that spans two rows); pairs across documents are not."""
    lengths = np.array([len(d.ids) for d in documents])
    stream = np.concatenate([d.ids for d in documents])                                 # [S]
    rows = -(-len(stream) // seq_len)
    ids = np.full(rows * seq_len, pad_id, dtype=id_dtype(max(stream.max(), pad_id)))   # [R * T]
    ids[:len(stream)] = stream
    ends = np.cumsum(lengths)
    flags = np.zeros(rows * seq_len, dtype=np.uint8)
    flags[:len(stream)] = TARGET
    flags[ends - 1] = 0                                     # a document's last token predicts nothing
    flags[ends - lengths] |= SEGMENT_START
    flags[::seq_len] |= SEGMENT_START                       # each row starts a segment (a continued document)
    if len(stream) < len(flags):
        flags[len(stream)] |= SEGMENT_START                 # the padding
    return {"input_ids": ids.reshape(rows, seq_len), "flags": flags.reshape(rows, seq_len)}


def example_rows(groups: list[list[Tokenized]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One row per group of whole examples (each at most seq_len tokens, checked before), right-padded."""
    max_id = max(pad_id, max(int(e.ids.max()) for group in groups for e in group))
    ids = np.full((len(groups), seq_len), pad_id, dtype=id_dtype(max_id))              # [R, T]
    flags = np.zeros((len(groups), seq_len), dtype=np.uint8)
    for row, group in enumerate(groups):
        start = 0
        for example in group:
            end = start + len(example.ids)
            ids[row, start:end] = example.ids
            flags[row, start:end - 1] = np.where(example.trainable[1:], TARGET, 0)
            flags[row, start] |= SEGMENT_START
            start = end
        if start < seq_len:
            flags[row, start] |= SEGMENT_START
    return {"input_ids": ids, "flags": flags}


def sft_rows(examples: list[Tokenized], seq_len: int, pad_id: int, pack: bool) -> dict[str, np.ndarray]:
    """One example per row, or with `pack` as many whole examples as fit, in order (next fit)."""
    groups: list[list[Tokenized]] = []
    used = seq_len
    for example in examples:
        if not pack or used + len(example.ids) > seq_len:
            groups.append([])
            used = 0
        groups[-1].append(example)
        used += len(example.ids)
    return example_rows(groups, seq_len, pad_id)


def dpo_rows(pairs: list[tuple[Tokenized, Tokenized]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """chosen_* and rejected_* rows, right-padded with pad_id; targets only on the response tokens (and eos)."""
    columns = {}
    for side, index in (("chosen", 0), ("rejected", 1)):
        rows = example_rows([[pair[index]] for pair in pairs], seq_len, pad_id)
        columns.update({f"{side}_{name}": column for name, column in rows.items()})
    return columns


def expand(input_ids: np.ndarray, flags: np.ndarray, rows: np.ndarray) -> dict[str, torch.Tensor]:
    """Stored columns [N, T] (memory-mapped) at `rows` [B] -> int64 input_ids, labels, segment_ids [B, T]."""
    ids = torch.from_numpy(input_ids[rows].astype(np.int64))                               # [B, T]
    row_flags = torch.from_numpy(flags[rows])                                              # [B, T]
    following = np.minimum(rows + 1, len(input_ids) - 1)
    first_of_next = torch.from_numpy(input_ids[following, :1].astype(np.int64))            # [B, 1]
    next_ids = torch.cat([ids[:, 1:], first_of_next], dim=1)                               # [B, T]
    labels = torch.where((row_flags & TARGET).bool(), next_ids, IGNORE_INDEX)
    segment_ids = torch.cumsum((row_flags & SEGMENT_START).bool().long(), dim=1) - 1
    return {"input_ids": ids, "labels": labels, "segment_ids": segment_ids}
