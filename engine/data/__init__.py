"""Training data: records from files, dirs or the hub -> checked -> tokenized (cached) -> rows of seq_len tokens.

`build_dataset("cpt" | "sft" | "dpo", DataConfig(...), tokenizer, seq_len)` returns a RowDataset whose rows the
trainer indexes with a tensor of row indices. Every rank of a torch.distributed job calls it: each tokenizes a share
of the records, and the rows, cached once, are memory-mapped by all (3 bytes per token, see rows.py). Batch keys:
- cpt, sft: input_ids, labels (shifted: labels[:, t] is the target of position t, -100 = no loss), segment_ids.
- dpo: chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels (right-padded with pad_id).

Sources (`path`): see sources.py; a list is read in order and concatenated, e.g. the default SFT mix
`DEFAULT_SFT_DATA`. Templates: see templates.py. Packing and labels: see rows.py.

Bad input raises a DataError naming the file and line (or record), or, with `skip_bad_records=True`, is skipped,
counted in `num_skipped` and summarized in one warning on the "hippocrates" logger: unreadable lines (malformed
JSON, non-UTF-8 bytes), missing or empty fields, empty files, SFT/DPO examples longer than seq_len (CPT documents
are cut across rows by design), DPO pairs whose chosen equals rejected.

Parts: `held_out=N` keeps the last N usable records out of "train" for part="held_out"; `limit=N` then takes the
first N records of the part. With held_out=0, reading stops after `limit` usable records.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from . import cache, shares
from .examples import Tokenized, check_record, render_all, tokenize_chunks, tokenize_documents
from .rows import IGNORE_INDEX, cpt_rows, dpo_rows, expand, sft_rows
from .sources import ROLES, BadRecords, DataError, Source, parse_source, read_source
from .templates import TEMPLATES

log = logging.getLogger("hippocrates")

STAGES = ("cpt", "sft", "dpo")
PARTS = ("train", "held_out")
DEFAULT_CPT_DATA = "corpus/medquad_qa.jsonl:text=answer"
DEFAULT_SFT_DATA = ["instruct/chatdoctor_genmedgpt5k.json", "instruct/medalpaca_medical_meadow_small.json",
                    "corpus/medquad_qa.jsonl:instruction=question,output=answer"]
DEFAULT_DPO_DATA = "preference/liveqa_med_graded_pairs.jsonl"


@dataclass
class DataConfig:
    path: str | list[str] = ""  # file, dir or hub name, each with an optional ":role=key,..." field mapping
    text_field: str = "text"
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    template: str = "alpaca"      # "alpaca" | "chat" (the tokenizer's chat template)
    pack: bool = False            # SFT: several whole examples per row
    skip_bad_records: bool = False
    split: str = "train"          # hub datasets
    limit: int | None = None
    held_out: int = 0
    text_unit: str = "document"   # plain text files: "document" (a file) | "paragraph" (blank-line separated)
    cache: bool = True


@dataclass
class RowDataset:
    columns: dict[str, np.ndarray]   # rows.py's stored columns, each [N, T], memory-mapped from the cache
    num_skipped: int = 0
    num_tokens: int = 0               # non-pad input tokens
    from_cache: bool = False

    def __len__(self) -> int:
        return next(iter(self.columns.values())).shape[0]

    def __getitem__(self, index) -> dict[str, torch.Tensor]:
        """Row(s) `index` (an int, a slice, or a tensor / array of row indices) -> the batch's int64 tensors."""
        single = isinstance(index, (int, np.integer))
        rows = np.arange(len(self))[index] if isinstance(index, slice) else np.atleast_1d(np.asarray(index))
        batch = {}
        for prefix in ("chosen_", "rejected_") if "chosen_input_ids" in self.columns else ("",):
            expanded = expand(self.columns[f"{prefix}input_ids"], self.columns[f"{prefix}flags"], rows)
            for name in ("input_ids", "labels") if prefix else ("input_ids", "labels", "segment_ids"):
                batch[prefix + name] = expanded[name][0] if single else expanded[name]
        return batch

    @property
    def bytes_per_token(self) -> int:
        """What each token position of a row keeps in memory (all columns)."""
        sides = 2 if "chosen_input_ids" in self.columns else 1
        return sum(column.dtype.itemsize for column in self.columns.values()) // sides


def build_dataset(stage: str, data_cfg: DataConfig, tokenizer, seq_len: int, part: str = "train") -> RowDataset:
    """The rows, tokenized once and cached. Under torch.distributed every rank must call it: the ranks tokenize a
    share each (see shares.py) and rank 0 writes the cache; with `cache=False` each process builds alone."""
    check_options(stage, data_cfg, tokenizer, seq_len, part)
    sources = [parse_source(spec, default_data_dir()) for spec in as_list(data_cfg.path)]
    if not data_cfg.cache:
        columns, counts = build_rows(stage, sources, data_cfg, tokenizer, seq_len, part)
        return RowDataset(columns, **counts)
    options = {k: v for k, v in asdict(data_cfg).items() if k not in ("path", "cache")}
    path = cache.cache_path(stage, {"stage": stage, "part": part, "seq_len": seq_len, "options": options,
                                    "sources": [[s.spec, s.identity()] for s in sources],
                                    "tokenizer": cache.tokenizer_fingerprint(tokenizer)})
    rank, world = shares.rank_and_world()
    with cache.exclusive(path) if rank == 0 else nullcontext():  # other jobs wait for this one's rank 0
        hit = shares.from_main(rank == 0 and cache.load(path) is not None, world)
        if not hit:
            build_rows(stage, sources, data_cfg, tokenizer, seq_len, part, path)
    cached = cache.load(path)
    if cached is None:
        raise DataError(f"{path}: rank {rank} cannot read the tokenized rows rank 0 wrote (is the cache dir shared?)")
    columns, counts = cached
    dataset = RowDataset(columns, counts["num_skipped"], counts["num_tokens"], from_cache=hit)
    if hit and rank == 0:
        log.info("%s data (%s): %d rows from the cache %s (%d bad records were skipped)", stage, part, len(dataset),
                 path, dataset.num_skipped)
    return dataset


def build_rows(stage: str, sources: list[Source], data_cfg: DataConfig, tokenizer, seq_len: int, part: str,
               path: Path | None = None) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Read and check the records (every rank), tokenize this rank's share, join the shares on rank 0 into rows.

    With `path` (the cache file) the ranks share the work and rank 0 writes the rows there; without, this process
    does it all. Returns (columns, {"num_skipped", "num_tokens"}) where the rows were built (rank 0).
    """
    rank, world = shares.rank_and_world() if path is not None else (0, 1)
    bad = BadRecords(data_cfg.skip_bad_records)
    items = select_part(checked_records(stage, sources, data_cfg, bad), data_cfg, part)
    groups = tokenize_shared(stage, items, data_cfg, tokenizer, seq_len, bad, path, rank, world)
    if rank != 0:
        shares.barrier(world)  # rank 0 writes the cache
        return {}, {}
    if world > 1:
        group_size = 2 if stage == "dpo" else 1
        groups = [group for r in range(world) for group in shares.read(shares.share_path(path, r, world), group_size)]
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    if stage == "cpt":
        columns = cpt_rows([group[0] for group in groups], seq_len, pad_id)
    elif stage == "sft":
        columns = sft_rows([group[0] for group in groups], seq_len, pad_id, data_cfg.pack)
    else:
        columns = dpo_rows([tuple(group) for group in groups], seq_len, pad_id)
    counts = {"num_skipped": bad.count, "num_tokens": sum(len(e.ids) for group in groups for e in group)}
    bad.log_summary()
    log.info("%s data (%s): %d records -> %d rows of %d tokens (%d tokens, %d bad records skipped)", stage, part,
             len(items), len(columns["flags" if stage != "dpo" else "chosen_flags"]), seq_len, counts["num_tokens"],
             bad.count)
    if path is not None:
        cache.save(path, columns, counts)
        if world > 1:
            for r in range(world):
                shares.share_path(path, r, world).unlink()
        shares.barrier(world)
    return columns, counts


def tokenize_shared(stage: str, items: list[tuple], data_cfg: DataConfig, tokenizer, seq_len: int, bad: BadRecords,
                    path: Path | None, rank: int, world: int) -> list[list[Tokenized]]:
    """Tokenize this rank's share of `items` (written beside the cache when there are several ranks); every rank
    then learns what the others skipped (merged into `bad`) and fails if any failed."""
    share_bad = BadRecords(data_cfg.skip_bad_records)
    try:
        groups = tokenize_share(stage, items[shares.my_share(len(items), rank, world)], data_cfg, tokenizer, seq_len,
                                share_bad)
        if world > 1:
            shares.write(shares.share_path(path, rank, world), groups)
        failure = None
    except Exception as error:  # every rank must learn of it, or the others would wait for this one forever
        groups, failure = [], error
    message = (None if failure is None else str(failure) if isinstance(failure, DataError)
               else f"rank {rank}: {type(failure).__name__}: {failure}")
    reports = shares.gather((message, share_bad.state(), len(groups)), world)
    if failure is not None:
        raise failure
    first_failure = next((message for message, _, _ in reports if message is not None), None)
    if first_failure is not None:
        raise DataError(first_failure)
    for _, state, _ in reports:
        bad.merge(state)
    if stage != "cpt" and not sum(count for _, _, count in reports):
        raise DataError(f"{describe(data_cfg.path)}: no example fits seq_len={seq_len}")
    return groups


def tokenize_share(stage: str, items: list[tuple], data_cfg: DataConfig, tokenizer, seq_len: int,
                   bad: BadRecords) -> list[list[Tokenized]]:
    """(location, fields) -> groups of tokenized examples: one document (CPT), one example (SFT), a pair (DPO).
    Examples longer than seq_len are reported to `bad` (CPT documents are cut across rows instead)."""
    if stage == "cpt":
        return [[document] for document in tokenize_documents([text for _, text in items], tokenizer)]
    rendered = render_all(stage, items, data_cfg.template, tokenizer, bad)
    tokenized = iter(tokenize_chunks([c for _, chunk_lists in rendered for c in chunk_lists], tokenizer,
                                     data_cfg.template))
    groups = []
    for location, chunk_lists in rendered:
        group = [next(tokenized) for _ in chunk_lists]
        if fits(group, seq_len, location, bad):
            groups.append(group)
    return groups


def check_options(stage: str, cfg: DataConfig, tokenizer, seq_len: int, part: str):
    if stage not in STAGES:
        raise DataError(f"stage {stage!r}: expected one of {', '.join(STAGES)}")
    if part not in PARTS:
        raise DataError(f"part {part!r}: expected one of {', '.join(PARTS)}")
    if part == "held_out" and cfg.held_out <= 0:
        raise DataError("part='held_out' needs data.held_out > 0")
    if cfg.template not in TEMPLATES:
        raise DataError(f"data.template {cfg.template!r}: expected one of {', '.join(TEMPLATES)}")
    if cfg.template == "chat" and stage != "cpt" and not getattr(tokenizer, "chat_template", None):
        raise DataError("data.template='chat' but the tokenizer has no chat template (use template=alpaca)")
    if cfg.text_unit not in ("document", "paragraph"):
        raise DataError(f"data.text_unit {cfg.text_unit!r}: expected 'document' or 'paragraph'")
    if seq_len < 2:
        raise DataError(f"seq_len={seq_len}: need at least 2 tokens per row")
    if not as_list(cfg.path):
        raise DataError("data.path is empty: give a file, a dir or a hub dataset name")


def checked_records(stage: str, sources: list[Source], cfg: DataConfig, bad: BadRecords) -> Iterator[tuple]:
    """(location, checked fields) of every usable record of the sources, in order."""
    for source in sources:
        keys = {role: source.fields.get(role, getattr(cfg, f"{role}_field")) for role in ROLES}
        for location, record in read_source(source, cfg.split, cfg.text_unit, bad):
            fields = check_record(stage, record, keys, cfg.template, location, bad)
            if fields is not None:
                yield location, fields


def select_part(records: Iterator[tuple], cfg: DataConfig, part: str) -> list[tuple]:
    if cfg.held_out == 0:
        items = list(islice(records, cfg.limit))
    else:
        items = list(records)
        if cfg.held_out >= len(items):
            raise DataError(f"{describe(cfg.path)}: held_out={cfg.held_out} leaves no training records "
                            f"(there are {len(items)})")
        items = items[:-cfg.held_out] if part == "train" else items[-cfg.held_out:]
        items = items[:cfg.limit]
    if not items:
        raise DataError(f"{describe(cfg.path)}: no usable records")
    return items


def fits(group: list[Tokenized], seq_len: int, location: str, bad: BadRecords) -> bool:
    sides = ("",) if len(group) == 1 else ("chosen: ", "rejected: ")
    for side, example in zip(sides, group):
        if len(example.ids) > seq_len:
            bad(location, f"{side}{len(example.ids)} tokens, longer than seq_len={seq_len}", "examples too long")
            return False
    return True


def default_data_dir():
    from hippocrates.models.paths import data_dir
    try:
        return data_dir()
    except FileNotFoundError:
        return None


def as_list(path) -> list[str]:
    if not path:
        return []
    return [path] if isinstance(path, str) else list(path)


def describe(path) -> str:
    return ", ".join(as_list(path)) or "data"


__all__ = ["DEFAULT_CPT_DATA", "DEFAULT_DPO_DATA", "DEFAULT_SFT_DATA", "DataConfig", "DataError", "IGNORE_INDEX",
           "RowDataset", "build_dataset"]
