"""The SFT data of a pipeline run, as the Hippocrates recipe builds it: general medical instructions plus
evaluation instructions, written as JSON Lines of {instruction, input, output, source} into the run dir.

- General instructions: records of GenMedGPT-5k, Medical Meadow and MedQuAD pairs (any engine.data source spec,
  with its `:role=key` field mapping), all of them or a seeded sample of `count` per source.
- Evaluation instructions: the benchmarks' non-test items (MedQA dev, the 500 PubMedQA PQA-L items outside the
  test split) in the evaluation's own prompt format: the instruction is exactly the prompt eval/ scores and the
  output is the gold answer's continuation (" C", " yes", or " " + the option's text), one record per item and
  distinct protocol. A benchmark without a non-test split here (MedMCQA: its dev split is what we evaluate) is
  refused. Items whose question also appears among a benchmark's test questions are dropped and counted.

`count` larger than the available records repeats them (whole passes, then a seeded sample of the rest).
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from hippocrates.engine.data.sources import BadRecords, parse_source, read_source
from hippocrates.eval.tasks import build_request, load_task

from .heldout import distinct_protocols, write_if_changed


class SftDataError(ValueError):
    """A bad SFT mixture setting; the message names the key."""


def write_general(sources: dict[str, int | None], seed: int, data_dir: Path, path: Path) -> dict[str, int]:
    """A seeded sample of `count` records per source -> `path` (JSON Lines); returns records per source."""
    lines, counts = [], {}
    for spec, count in sources.items():
        source = parse_source(spec, data_dir)
        keys = {role: source.fields.get(role, role) for role in ("instruction", "input", "output")}
        records = [{"instruction": r.get(keys["instruction"]), "input": r.get(keys["input"]) or "",
                    "output": r.get(keys["output"]), "source": spec}
                   for _, r in read_source(source, "train", "document", BadRecords(skip=True))]
        records = [r for r in records if isinstance(r["instruction"], str) and isinstance(r["output"], str)
                   and r["instruction"].strip() and r["output"].strip()]
        if not records:
            raise SftDataError(f"sft_data.general: {spec} has no usable instruction/output records")
        picked = sample(records, count, random.Random(f"{seed}:{spec}"))
        counts[spec] = len(picked)
        lines += [json.dumps(r, ensure_ascii=False) for r in picked]
    write_if_changed(path, "".join(line + "\n" for line in lines))
    return counts


def write_eval_instructions(tasks: dict[str, int | None], protocols: list[str], test_questions: set[str],
                            seed: int, data_dir: Path, path: Path) -> dict[str, dict]:
    """Instruction records from each benchmark's non-test split in its evaluation prompt format -> `path`."""
    lines, summary = [], {}
    for name, count in tasks.items():
        task = load_task(name, data_dir)
        if task.fewshot_excludes_self or not task.fewshot_pool:
            raise SftDataError(f"sft_data.eval_instructions: {name} has no non-test split in {data_dir} "
                               f"(its only split is the evaluated one)")
        pool = [item for item in task.fewshot_pool if normalize(item.question) not in test_questions]
        dropped = len(task.fewshot_pool) - len(pool)
        scored = sorted(set(distinct_protocols(task.spec, protocols).values()), key=protocols.index)
        records, seen = [], set()
        for protocol in scored:
            for item in pool:
                request = build_request(task, item, protocol, num_fewshot=0)
                record = {"instruction": request.context, "input": "", "output": request.continuations[request.gold],
                          "source": f"{name}/{protocol}", "id": item.id}
                if (record["instruction"], record["output"]) in seen:  # protocols that prompt alike: one record
                    continue
                seen.add((record["instruction"], record["output"]))
                records.append(record)
        formats = len({r["source"] for r in records})
        picked = sample(records, None if count is None else count * formats, random.Random(f"{seed}:{name}"))
        summary[name] = {"records": len(picked), "items": len(pool), "protocols": scored,
                         "dropped_test_overlap": dropped}
        lines += [json.dumps(r, ensure_ascii=False) for r in picked]
    write_if_changed(path, "".join(line + "\n" for line in lines))
    return summary


def benchmark_test_questions(task_names: list[str], data_dir: Path) -> set[str]:
    """Normalized question texts of every test item of the tasks (not only the evaluated subset)."""
    return {normalize(item.question) for name in task_names for item in load_task(name, data_dir).items}


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def sample(records: list, count: int | None, rng: random.Random) -> list:
    """All records (count None), or `count` of them: whole shuffled passes, then a sample of the rest."""
    if count is None:
        return list(records)
    if count < 0:
        raise SftDataError(f"sft_data: count {count} must be >= 0 (or null for all records)")
    passes, rest = divmod(count, len(records))
    picked = []
    for _ in range(passes):
        picked += rng.sample(records, len(records))
    return picked + rng.sample(records, rest)
