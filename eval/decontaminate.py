"""Which benchmark test items share a 13-gram with the training text? (GPT-3's and lm-evaluation-harness's rule.)

    python -m hippocrates.eval.decontaminate --train corpus/medquad_qa.jsonl instruct/ --tasks medqa,medmcqa,pubmedqa \
        [--data-dir DIR] [--n 13] [--out contamination.json]

Per training source and per benchmark split (the evaluated one: MedQA test, MedMCQA dev, the 500 PubMedQA test
items, or a spec file's data), how many items share at least one n-gram with the source, and which.

- Text is normalized as lm-eval's decontamination does: lower case, words = runs of letters and digits (punctuation
  and whitespace dropped). An item's text is its question, its options and its extra fields (PubMedQA's abstract).
- Items are indexed, not the training text: every item n-gram goes into a dict keyed by its hash (a few hundred
  thousand entries for the three benchmarks); each training record is then streamed once and its n-grams looked up.
  Items with fewer than n words cannot match and are counted apart.
- A training source is a file (JSON, JSON Lines, CSV, parquet, or plain .txt / .md text), a folder (every such
  file in it) or a hub dataset name (its train split), read with eval's own record reader; every string in a
  record counts as training text (whatever fields a stage reads, this over-counts rather than misses). A
  `:field=...` suffix, as training data specs carry, is ignored for the same reason.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from .records import DATA_SUFFIXES, EvalError, read_records
from .tasks import Item, load_task

NGRAM = 13
WORD = re.compile(r"\w+")
TEXT_SUFFIXES = (".txt", ".md")  # plain text, as the training data reader takes it


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def ngram_hashes(tokens: list[str], n: int):
    for i in range(len(tokens) - n + 1):
        yield hash(tuple(tokens[i:i + n]))


def item_text(item: Item) -> str:
    return "\n".join([item.question, *item.choices, *item.fields.values()])


def record_strings(value) -> list[str]:
    """Every string inside a record (dict values and list entries, recursively)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in record_strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in record_strings(v)]
    return []


class ItemIndex:
    """The n-grams of every evaluated item of the tasks: hash -> [(task, item id)]."""

    def __init__(self, task_names: list[str], data_dir=None, n: int = NGRAM):
        self.n = n
        self.grams: dict[int, list[tuple[str, str]]] = {}
        self.splits: dict[str, dict] = {}
        for name in task_names:
            task = load_task(name, data_dir=data_dir)
            short = 0
            for item in task.items:
                tokens = words(item_text(item))
                if len(tokens) < n:
                    short += 1
                for h in set(ngram_hashes(tokens, n)):
                    self.grams.setdefault(h, []).append((task.spec.name, item.id))
            self.splits[task.spec.name] = {"split": str(task.spec.data), "items": len(task.items),
                                           "shorter_than_n": short}

    def matches(self, texts: list[str]) -> set[tuple[str, str]]:
        found = set()
        for text in texts:
            for h in ngram_hashes(words(text), self.n):
                hit = self.grams.get(h)
                if hit:
                    found.update(hit)
        return found


def source_files(source: str, data_dir: Path | None) -> list[Path] | str:
    """The data files of a training source, or the source itself when it names a hub dataset."""
    candidates = [source]
    if ":" in source:
        candidates.append(source.split(":", 1)[0])  # a data spec's field mapping: ignored, every string counts
    for candidate in candidates:
        for base in ([Path.cwd()] + ([Path(data_dir)] if data_dir else [])):
            path = Path(candidate) if Path(candidate).is_absolute() else base / candidate
            if path.is_file():
                return [path]
            if path.is_dir():
                files = sorted(p for p in path.rglob("*")
                               if p.suffix.lower() in DATA_SUFFIXES + TEXT_SUFFIXES and p.is_file())
                if not files:
                    raise EvalError(f"--train {source}: the folder {path} holds no .json/.jsonl/.csv/.parquet file")
                return files
    if Path(candidates[-1]).suffix.lower() in DATA_SUFFIXES + TEXT_SUFFIXES:
        raise EvalError(f"--train {source}: no such file (looked in the working dir"
                        + (f" and {data_dir})" if data_dir else ")"))
    return source


def scan_source(source: str, index: ItemIndex, data_dir=None) -> dict:
    """{"records": how many were read, "tasks": {task: sorted contaminated item ids}} for one training source."""
    files = source_files(source, data_dir)
    found, count = set(), 0  # count: records read (a plain text file is one record)
    for file in ([files] if isinstance(files, str) else files):
        if isinstance(file, Path) and file.suffix.lower() in TEXT_SUFFIXES:
            texts, count = [file.read_text(encoding="utf-8", errors="replace")], count + 1
        else:
            records = read_records(file, split="train") if isinstance(file, str) else read_records(file)
            texts, count = [s for record in records for s in record_strings(record.value)], count + len(records)
        found |= index.matches(texts)
    by_task = {task: sorted({i for t, i in found if t == task}, key=_id_order) for task in index.splits}
    return {"records": count, "tasks": by_task}


def _id_order(item_id: str):
    return (0, int(item_id), "") if item_id.isdigit() else (1, 0, item_id)


def decontaminate(train: list[str], task_names: list[str], data_dir=None, n: int = NGRAM) -> dict:
    """The whole report: {"n", "splits": {task: {split, items, shorter_than_n}}, "sources": {source: scan}}."""
    index = ItemIndex(task_names, data_dir, n)
    return {"n": n, "splits": index.splits,
            "sources": {source: scan_source(source, index, data_dir) for source in train}}


def markdown_table(report: dict, list_limit: int | None = None) -> str:
    """Contaminated / evaluated items per training source and benchmark split, then the ids (up to list_limit)."""
    tasks = list(report["splits"])
    lines = ["| training source | records | " + " | ".join(f"{t} ({report['splits'][t]['items']} items)"
                                                            for t in tasks) + " |",
             "|---|---:|" + "---:|" * len(tasks)]
    listed = []
    for source, scan in report["sources"].items():
        cells = [f"{len(scan['tasks'][t])}" for t in tasks]
        lines.append(f"| {source} | {scan['records']} | " + " | ".join(cells) + " |")
        for t in tasks:
            ids = scan["tasks"][t]
            if ids:
                shown = ids if list_limit is None else ids[:list_limit]
                more = f" ... and {len(ids) - len(shown)} more" if len(shown) < len(ids) else ""
                listed.append(f"- {source} / {t}: " + ", ".join(shown) + more)
    short = [f"{t}: {s['shorter_than_n']}" for t, s in report["splits"].items() if s["shorter_than_n"]]
    notes = [f"Items sharing at least one {report['n']}-gram (lower-cased words) with the source."]
    if short:
        notes.append(f"Items shorter than {report['n']} words (cannot match): " + ", ".join(short) + ".")
    return "\n".join(lines + [""] + notes + ([""] + listed if listed else []))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hippocrates.eval.decontaminate",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--train", nargs="+", required=True, help="training files, folders or hub dataset names")
    parser.add_argument("--tasks", default="medqa,medmcqa,pubmedqa")
    parser.add_argument("--data-dir", default=None, help="root of relative paths (default: models.paths.data_dir())")
    parser.add_argument("--n", type=int, default=NGRAM, help="n-gram length in words (default 13)")
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        if args.n < 1:
            raise EvalError(f"--n must be >= 1, got {args.n}")
        data_dir = args.data_dir
        if data_dir is None:
            from .tasks import _default_data_dir
            data_dir = _default_data_dir()
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        report = decontaminate(args.train, tasks, data_dir, args.n)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(markdown_table(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    print(f"\n({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
