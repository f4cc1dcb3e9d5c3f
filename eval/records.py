"""Records from local JSON / JSON Lines / CSV / parquet files or Hugging Face hub datasets, each with where it came
from (file and line, or row), so that a bad record is reported by its place."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


class EvalError(ValueError):
    """A bad task name, spec, data file or option; the message names the file, line or key."""


@dataclass
class Record:
    default_id: str
    where: str  # "file:line 12", for error messages
    value: dict


def resolve_data_path(source: str, search_dirs: list, task: str) -> Path | str:
    """A local path if one exists (absolute, or in one of search_dirs); else the string itself (a hub name)."""
    candidate = Path(source)
    if candidate.is_absolute():
        return candidate
    dirs = [Path(d) for d in search_dirs if d is not None]
    for base in dirs:
        if (base / candidate).exists():
            return base / candidate
    if candidate.exists():
        return candidate
    if candidate.suffix.lower() in DATA_SUFFIXES:
        looked = ", ".join(str(base / candidate) for base in dirs) or "."
        raise EvalError(f"task {task}: data file {source} not found (looked in {looked})")
    return source


def read_records(source: Path | str, split: str | None = None, subset: str | None = None,
                 columns: list[str] | None = None) -> list[Record]:
    """columns: the field names of a headerless CSV (MMLU's layout), in column order; a CSV without them has a
    header line."""
    if isinstance(source, str):
        return _read_hub(source, split, subset)
    if not source.is_file():
        raise EvalError(f"{source}: data file not found")
    suffix = source.suffix.lower()
    try:
        if suffix == ".jsonl":
            return _read_jsonl(source)
        if suffix == ".json":
            return _read_json(source)
        if suffix == ".csv":
            return _read_csv(source, columns)
        if suffix == ".parquet":
            import pyarrow.parquet as pq
            rows = pq.read_table(source).to_pylist()
            return [Record(str(i), f"{source}: row {i}", row) for i, row in enumerate(rows)]
    except EvalError:
        raise
    except (csv.Error, OSError, ValueError) as err:  # bad bytes, bad CSV; pyarrow's errors derive from these too
        raise EvalError(f"{source}: cannot read ({type(err).__name__}: {err})") from None
    raise EvalError(f"{source}: unsupported data file type {suffix!r} (expected .json, .jsonl, .csv or .parquet)")


def _read_csv(path: Path, columns: list[str] | None) -> list[Record]:
    records = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, fieldnames=columns)
        for row in reader:
            where = f"{path}:line {reader.line_num}"
            if columns is not None and (None in row or None in row.values()):  # extra fields / missing fields
                found = sum(row[c] is not None for c in columns) + len(row.get(None) or [])
                raise EvalError(f"{where}: {found} fields where `columns` names {len(columns)}")
            records.append(Record(str(len(records)), where, row))
    return records


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalError(f"{path}:line {line_no}: not valid JSON ({err.msg})") from None
            if not isinstance(value, dict):
                raise EvalError(f"{path}:line {line_no}: expected a JSON object")
            records.append(Record(str(len(records)), f"{path}:line {line_no}", value))
    return records


def _read_json(path: Path) -> list[Record]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EvalError(f"{path}:line {err.lineno}: not valid JSON ({err.msg})") from None
    if isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()):  # keyed by id (PubMedQA)
        return [Record(str(key), f"{path}: record {key!r}", value) for key, value in data.items()]
    if isinstance(data, list):
        for i, value in enumerate(data):
            if not isinstance(value, dict):
                raise EvalError(f"{path}: record {i} is not a JSON object")
        return [Record(str(i), f"{path}: record {i}", value) for i, value in enumerate(data)]
    raise EvalError(f"{path}: expected a list of records or an object of records keyed by id")


def _read_hub(name: str, split: str | None, subset: str | None) -> list[Record]:
    import datasets
    try:
        rows = datasets.load_dataset(name, subset, split=split or "test")
    except Exception as err:  # network, missing dataset, missing split
        raise EvalError(f"{name}: cannot load as a local file or a hub dataset ({type(err).__name__}: {err})") from None
    return [Record(str(i), f"{name}[{split or 'test'}]: row {i}", dict(row)) for i, row in enumerate(rows)]


def get_field(record: Record, path: str):
    value = record.value
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value or value[part] is None:
            raise EvalError(f"{record.where}: missing field {path!r}")
        value = value[part]
    return value
