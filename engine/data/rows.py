"""Token ids -> fixed-length rows of T tokens: CPT packing, SFT rows (padded or packed), DPO pairs.

Labels are shifted here: labels[t] is the target of the prediction made at position t (-100: no loss).
Segment ids number the documents (examples) of a row 0, 1, 2, ... in order; the padding at the end of a row is one
more segment of its own. The model restarts positions at each segment start, so a CPT document that continues from
the previous row starts at position 0 again in its new row.
"""
from __future__ import annotations

import numpy as np
import torch

from .examples import Tokenized

IGNORE_INDEX = -100


def cpt_rows(documents: list[np.ndarray], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Documents concatenated into one stream cut into rows of seq_len, the last row padded. Every next-token pair
    within a document is a target (also the pair that spans two rows); pairs across documents are not."""
    stream = np.concatenate(documents)                                                   # [S]
    doc = np.repeat(np.arange(len(documents)), [len(d) for d in documents])             # [S]
    rows = -(-len(stream) // seq_len)
    pad = rows * seq_len - len(stream)
    stream = np.concatenate([stream, np.full(pad, pad_id, dtype=np.int64)])             # [R * T]
    doc = np.concatenate([doc, np.full(pad, -1)])
    next_doc = np.append(doc[1:], -1)
    labels = np.where((next_doc == doc) & (doc >= 0), np.append(stream[1:], pad_id), IGNORE_INDEX)
    doc = doc.reshape(rows, seq_len)                                                    # [R, T]
    segments = doc - doc[:, :1]
    if pad:
        segments[-1, seq_len - pad:] = segments[-1, seq_len - pad - 1] + 1
    return {"input_ids": torch.from_numpy(stream.reshape(rows, seq_len)),
            "labels": torch.from_numpy(labels.reshape(rows, seq_len)),
            "segment_ids": torch.from_numpy(segments)}


def shifted_labels(example: Tokenized) -> np.ndarray:
    """[L] targets of each position: the next token where that token carries loss, else -100 (the last one too)."""
    labels = np.full(len(example.ids), IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = np.where(example.trainable[1:], example.ids[1:], IGNORE_INDEX)
    return labels


def sft_rows(examples: list[Tokenized], seq_len: int, pad_id: int, pack: bool) -> dict[str, torch.Tensor]:
    """One example per row, or with `pack` as many whole examples as fit, in order (next fit); each example is
    at most seq_len tokens long (checked before)."""
    groups: list[list[Tokenized]] = []
    used = seq_len
    for example in examples:
        if not pack or used + len(example.ids) > seq_len:
            groups.append([])
            used = 0
        groups[-1].append(example)
        used += len(example.ids)
    input_ids = torch.full((len(groups), seq_len), pad_id, dtype=torch.long)    # [R, T]
    labels = torch.full((len(groups), seq_len), IGNORE_INDEX, dtype=torch.long)
    segment_ids = torch.zeros((len(groups), seq_len), dtype=torch.long)
    for row, group in enumerate(groups):
        start = 0
        for segment, example in enumerate(group):
            end = start + len(example.ids)
            input_ids[row, start:end] = torch.from_numpy(example.ids)
            labels[row, start:end] = torch.from_numpy(shifted_labels(example))
            segment_ids[row, start:end] = segment
            start = end
        segment_ids[row, start:] = len(group)
    return {"input_ids": input_ids, "labels": labels, "segment_ids": segment_ids}


def dpo_rows(pairs: list[tuple[Tokenized, Tokenized]], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """chosen_* and rejected_* rows, right-padded with pad_id; labels only on the response tokens (and eos)."""
    tensors = {}
    for side, index in (("chosen", 0), ("rejected", 1)):
        input_ids = torch.full((len(pairs), seq_len), pad_id, dtype=torch.long)   # [N, T]
        labels = torch.full((len(pairs), seq_len), IGNORE_INDEX, dtype=torch.long)
        for row, pair in enumerate(pairs):
            example = pair[index]
            input_ids[row, :len(example.ids)] = torch.from_numpy(example.ids)
            labels[row, :len(example.ids)] = torch.from_numpy(shifted_labels(example))
        tensors[f"{side}_input_ids"], tensors[f"{side}_labels"] = input_ids, labels
    return tensors
