"""Training data: records from files, dirs or the hub -> checked -> tokenized (cached) -> rows of seq_len tokens.

`build_dataset("cpt" | "sft" | "dpo", DataConfig(...), tokenizer, seq_len)` returns a RowDataset whose rows the
trainer indexes with a tensor of row indices. Batch keys:
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
from dataclasses import asdict, dataclass
from itertools import islice
from typing import Iterator

import torch

from . import cache
from .examples import Tokenized, check_record, render_all, tokenize_chunks, tokenize_documents
from .rows import IGNORE_INDEX, cpt_rows, dpo_rows, sft_rows
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
    tensors: dict[str, torch.Tensor]  # each [N, T]
    num_skipped: int = 0
    num_tokens: int = 0               # non-pad input tokens
    from_cache: bool = False

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, index) -> dict[str, torch.Tensor]:
        return {name: rows[index] for name, rows in self.tensors.items()}


def build_dataset(stage: str, data_cfg: DataConfig, tokenizer, seq_len: int, part: str = "train") -> RowDataset:
    check_options(stage, data_cfg, tokenizer, seq_len, part)
    sources = [parse_source(spec, default_data_dir()) for spec in as_list(data_cfg.path)]
    if not data_cfg.cache:
        return build_rows(stage, sources, data_cfg, tokenizer, seq_len, part)
    options = {k: v for k, v in asdict(data_cfg).items() if k not in ("path", "cache")}
    path = cache.cache_path(stage, {"stage": stage, "part": part, "seq_len": seq_len, "options": options,
                                    "sources": [[s.spec, s.identity()] for s in sources],
                                    "tokenizer": cache.tokenizer_fingerprint(tokenizer)})
    with cache.exclusive(path):  # ranks started together: one builds, the others wait and read the cache
        cached = cache.load(path)
        if cached is not None:
            tensors, meta = cached
            dataset = RowDataset(tensors, int(meta["num_skipped"]), int(meta["num_tokens"]), from_cache=True)
            log.info("%s data (%s): %d rows from the cache %s (%d bad records were skipped)", stage, part,
                     len(dataset), path, dataset.num_skipped)
            return dataset
        dataset = build_rows(stage, sources, data_cfg, tokenizer, seq_len, part)
        cache.save(path, dataset.tensors, {"num_skipped": str(dataset.num_skipped),
                                           "num_tokens": str(dataset.num_tokens)})
    return dataset


def build_rows(stage: str, sources: list[Source], data_cfg: DataConfig, tokenizer, seq_len: int,
               part: str) -> RowDataset:
    bad = BadRecords(data_cfg.skip_bad_records)
    items = select_part(checked_records(stage, sources, data_cfg, bad), data_cfg, part)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    if stage == "cpt":
        documents = tokenize_documents([text for _, text in items], tokenizer)
        num_tokens = sum(len(d) for d in documents)
        tensors = cpt_rows(documents, seq_len, pad_id)
    else:
        rendered = render_all(stage, items, data_cfg.template, tokenizer, bad)
        tokenized = iter(tokenize_chunks([c for _, chunk_lists in rendered for c in chunk_lists], tokenizer,
                                         data_cfg.template))
        examples = []
        for location, chunk_lists in rendered:
            group = [next(tokenized) for _ in chunk_lists]
            if fits(group, seq_len, location, bad):
                examples.append(group)
        if not examples:
            raise DataError(f"{describe(data_cfg.path)}: no example fits seq_len={seq_len}")
        num_tokens = sum(len(e.ids) for group in examples for e in group)
        if stage == "sft":
            tensors = sft_rows([group[0] for group in examples], seq_len, pad_id, data_cfg.pack)
        else:
            tensors = dpo_rows([tuple(group) for group in examples], seq_len, pad_id)
    bad.log_summary()
    dataset = RowDataset(tensors, bad.count, num_tokens)
    log.info("%s data (%s): %d records -> %d rows of %d tokens (%d tokens, %d bad records skipped)", stage, part,
             len(items), len(dataset), seq_len, num_tokens, bad.count)
    return dataset


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
