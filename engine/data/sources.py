"""Where records come from: local files and dirs (JSON, JSON Lines, CSV, parquet, text) and hub datasets.

A source is a string: a file, a dir (every data file under it, sorted), or a Hugging Face hub dataset name. A
relative path is looked up in the working dir first, then in `models.paths.data_dir()`. A source may rename the
fields it provides with a `:role=key,...` suffix, e.g. `corpus/medquad_qa.jsonl:instruction=question,output=answer`
reads the instruction from `question` and the output from `answer`; roles are the names in `ROLES`.

JSON and JSON Lines are parsed here, strictly, line by line, because the `datasets` JSON builder can neither name
the line that broke nor skip it. CSV, parquet, plain text and hub datasets are read by `datasets.load_dataset`.
Plain text gives one record `{"text": ...}` per file (`text_unit="document"`) or per blank-line-separated paragraph
(`text_unit="paragraph"`).

A bad JSON Lines line is one bad record (skippable). A JSON document, CSV or text file with a syntax error or a
non-UTF-8 byte cannot be cut into records past that point, so it always stops with a DataError.

Every record carries its location for error messages: `file, line N` (1-based) for JSON Lines, `file, record N`
(0-based index, as in `data[N]`) for JSON arrays, CSV, parquet and hub datasets, `file, paragraph N` (1-based) for
paragraphs of a text file.
"""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

log = logging.getLogger("hippocrates")

ROLES = ("text", "instruction", "input", "output", "messages", "prompt", "chosen", "rejected")
FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text", ".md": "text"}
_MAPPING = re.compile(r"^\w+=[^,=:/]+(,\w+=[^,=:/]+)*$")
_HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


class DataError(ValueError):
    """Bad data or a bad data option; the message names the file and line (or record, or key) in one line."""


class BadRecords:
    """Raises a DataError for a bad record, or, with `skip=True`, counts it and keeps the first few messages."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.count = 0
        self.reasons: Counter[str] = Counter()
        self.first: list[str] = []

    def __call__(self, location: str, reason: str, kind: str | None = None):
        message = f"{location}: {reason}"
        if not self.skip:
            raise DataError(f"{message} (skip_bad_records=true skips bad records)")
        self.count += 1
        self.reasons[kind or reason] += 1
        if len(self.first) < 3:
            self.first.append(message)

    def state(self) -> tuple[int, dict[str, int], list[str]]:
        return self.count, dict(self.reasons), list(self.first)

    def merge(self, state: tuple[int, dict[str, int], list[str]]):
        """Add the records another BadRecords (another rank's share) skipped, as if they came after ours."""
        count, reasons, first = state
        self.count += count
        self.reasons.update(reasons)
        self.first = (self.first + first)[:3]

    def log_summary(self):
        if self.count:
            kinds = ", ".join(f"{n} {kind}" for kind, n in self.reasons.most_common())
            log.warning("skipped %d bad records (%s); first: %s", self.count, kinds, " | ".join(self.first))


@dataclass
class Source:
    spec: str
    fields: dict[str, str]                            # role -> record key, for roles this source renames
    files: list[Path] = field(default_factory=list)  # local files, empty for a hub dataset
    hub_name: str | None = None

    def identity(self) -> list:
        """What the tokenized cache is keyed on: each file's path, size and mtime, or the hub name."""
        if self.hub_name:
            return [self.hub_name]
        return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in self.files]


def parse_source(spec: str, default_dir: Path | None) -> Source:
    """`path[:role=key,...]` or a hub name -> Source with its files resolved (DataError if none)."""
    name, fields = spec, {}
    head, sep, tail = spec.rpartition(":")
    if sep and _MAPPING.match(tail):
        name, fields = head, dict(pair.split("=", 1) for pair in tail.split(","))
        unknown = sorted(set(fields) - set(ROLES))
        if unknown:
            raise DataError(f"{spec}: unknown field role {unknown[0]!r} (roles: {', '.join(ROLES)})")
    path = Path(name).expanduser()
    if not path.exists() and not path.is_absolute() and default_dir is not None and (default_dir / path).exists():
        path = default_dir / path
    if path.is_file():
        return Source(spec, fields, [path.resolve()])
    if path.is_dir():
        files = sorted(p.resolve() for p in path.rglob("*")
                       if p.is_file() and p.suffix in FORMATS and not p.name.startswith("."))
        if not files:
            raise DataError(f"{path}: directory has no data files ({', '.join(FORMATS)})")
        return Source(spec, fields, files)
    if _HUB_NAME.match(name) and Path(name).suffix not in FORMATS:
        return Source(spec, fields, hub_name=name)
    where = f" or in {default_dir}" if default_dir is not None else ""
    raise DataError(f"{name}: no such file or directory (looked in the working dir{where})")


def read_source(source: Source, split: str, text_unit: str, bad: BadRecords) -> Iterator[tuple[str, dict]]:
    """(location, record) for every readable record of the source, in order; bad ones reported to `bad`."""
    if source.hub_name:
        yield from _read_hub(source.hub_name, split)
        return
    for path in source.files:
        kind = FORMATS.get(path.suffix, "jsonl")
        if path.stat().st_size == 0:
            records = iter(())
        elif kind == "jsonl":
            records = _read_jsonl(path, bad)
        elif kind == "json":
            records = _read_json(path, bad)
        else:
            records = _read_with_datasets(path, kind, text_unit)
        bad_before, count = bad.count, 0
        for count, item in enumerate(records, 1):
            yield item
        if count == 0 and bad.count == bad_before:
            bad(str(path), "empty file (no records)", "empty files")


def _read_jsonl(path: Path, bad: BadRecords) -> Iterator[tuple[str, dict]]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            location = f"{path}, line {number}"
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad(location, f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})", "non-UTF-8 lines")
                continue
            try:
                record = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                bad(location, f"malformed JSON ({e.msg} at column {e.colno})", "malformed JSON lines")
                continue
            if not isinstance(record, dict):
                bad(location, f"expected a JSON object, got {type(record).__name__}", "non-object records")
                continue
            yield location, record


def _read_json(path: Path, bad: BadRecords) -> Iterator[tuple[str, dict]]:
    """A JSON array of objects, an object of objects (keyed records), one object, or JSON Lines."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}, line {line}: not UTF-8 (byte 0x{raw[e.start]:02x}); a JSON document with a bad "
                        f"byte cannot be read past it") from None
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and e.lineno > 1:
            yield from _read_jsonl(path, bad)
            return
        raise DataError(f"{path}, line {e.lineno}: malformed JSON ({e.msg} at column {e.colno}); a JSON document "
                        f"cannot be read past a syntax error") from None
    if isinstance(data, list):
        items = ((f"{path}, record {i}", record) for i, record in enumerate(data))
    elif isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        items = ((f"{path}, key {key!r}", record) for key, record in data.items())
    elif isinstance(data, dict):
        items = [(f"{path}, line 1", data)]
    else:
        raise DataError(f"{path}: expected a JSON list of objects (or JSON Lines), got {type(data).__name__}")
    for location, record in items:
        if isinstance(record, dict):
            yield location, record
        else:
            bad(location, f"expected a JSON object, got {type(record).__name__}", "non-object records")


def _check_utf8(path: Path):
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}, line {line}: not UTF-8 (byte 0x{raw[e.start]:02x})") from None


def _read_with_datasets(path: Path, kind: str, text_unit: str) -> Iterator[tuple[str, dict]]:
    import datasets

    if kind in ("csv", "text"):
        _check_utf8(path)
    options = {"sample_by": text_unit, "keep_linebreaks": True} if kind == "text" else {}
    try:
        rows = datasets.load_dataset(kind, data_files=str(path), split="train", **options)
    except Exception as e:  # the datasets library raises many types; keep its first line, name the file
        raise DataError(f"{path}: cannot read as {kind}: {_first_line(e)}") from None
    if kind == "text":
        rows = [row for row in rows if row["text"].strip()]
        if text_unit == "document":
            yield from ((str(path), row) for row in rows)
        else:
            yield from ((f"{path}, paragraph {i + 1}", row) for i, row in enumerate(rows))
        return
    yield from ((f"{path}, record {i}", row) for i, row in enumerate(rows))


def _read_hub(name: str, split: str) -> Iterator[tuple[str, dict]]:
    import datasets

    try:
        rows = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise DataError(f"{name}: cannot load hub dataset (split {split!r}): {_first_line(e)}") from None
    yield from ((f"{name} ({split}), record {i}", row) for i, row in enumerate(rows))


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
