"""The held-out items of a pipeline run: a fixed, seeded subset of each benchmark's test split.

Every model of a run (the base model and each stage's output) is scored on the same items. The subset is written
as eval/ task spec files (`eval/tasks.py`'s YAML format) whose `select_ids` names the chosen records, so

    python -m hippocrates.eval.run --model M --tasks RUN/eval/tasks/medqa.yaml,RUN/eval/tasks/pubmedqa.yaml --scoring letter

scores exactly those items, whoever runs it. The items are drawn only from the evaluated split (MedQA test, MedMCQA
dev, the 500 PubMedQA test PMIDs); the few-shot pool of a spec never holds an evaluated item.

Baselines come from the chosen items themselves: chance is the mean of 1 / (number of choices), the majority class
is the accuracy of always answering the most frequent gold label (a letter, or PubMedQA's yes / no / maybe).
"""
from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from pathlib import Path

import yaml

from hippocrates.eval.tasks import FEWSHOT_REST, LETTERS, load_task, read_records, resolve_data_path, resolve_spec


def select_heldout(task_names: list[str], limits: dict[str, int | None], seed: int, data_dir: Path,
                   out_dir: Path) -> dict[str, dict]:
    """Write `out_dir/tasks/{task}.yaml` and `out_dir/items/{task}.json` for each task; return what was chosen:
    {task: {"spec": path, "n", "ids", "chance", "majority", "majority_label", "test_size"}}."""
    chosen = {}
    for name in task_names:
        spec = resolve_spec(name)
        records = read_records(resolve_data_path(spec.data, [spec.base_dir, data_dir], name), spec.split, spec.subset)
        test_ids = [r.default_id for r in records]
        if spec.select_ids:
            wanted = _id_set(resolve_data_path(spec.select_ids, [spec.base_dir, data_dir], name))
            test_ids = [i for i in test_ids if i in wanted]
        limit = limits.get(name)
        picked = set(test_ids) if limit is None or limit >= len(test_ids) else \
            set(random.Random(f"{seed}:{name}").sample(test_ids, limit))
        ids = [i for i in test_ids if i in picked]  # file order
        items_file = write_if_changed(out_dir / "items" / f"{name}.json", json.dumps(ids, indent=0) + "\n")

        raw = {k: v for k, v in dataclasses.asdict(spec).items() if k != "base_dir"}
        raw["data"] = str(Path(resolve_data_path(spec.data, [spec.base_dir, data_dir], name)).resolve())
        raw["select_ids"] = str(items_file.resolve())
        if spec.fewshot_data == FEWSHOT_REST:  # the records outside the original test split, never our items
            pool = {r.default_id: r.value for r in records if r.default_id not in set(test_ids)}
            pool_file = write_if_changed(out_dir / "items" / f"{name}_fewshot_pool.json", json.dumps(pool) + "\n")
            raw["fewshot_data"] = str(pool_file.resolve())
        elif spec.fewshot_data:
            raw["fewshot_data"] = str(Path(resolve_data_path(spec.fewshot_data, [spec.base_dir, data_dir], name)).resolve())
        spec_file = write_if_changed(out_dir / "tasks" / f"{name}.yaml", yaml.safe_dump(raw, sort_keys=False))

        task = load_task(str(spec_file))
        if len(task.items) != len(ids):
            raise ValueError(f"{spec_file}: selects {len(task.items)} items, expected {len(ids)}")
        chosen[name] = {"spec": str(spec_file), "test_size": len(test_ids), **baselines(task)}
    return chosen


def baselines(task) -> dict:
    """n, item ids, chance accuracy and the majority-class accuracy of a loaded task's items."""
    items = task.items
    labels = [gold_label(task.spec, item) for item in items]
    label, count = Counter(labels).most_common(1)[0]
    return {"n": len(items), "ids": [item.id for item in items],
            "chance": sum(1 / len(item.choices) for item in items) / len(items),
            "majority": count / len(items), "majority_label": label,
            "label_counts": dict(sorted(Counter(labels).items()))}


def gold_label(spec, item) -> str:
    return item.choices[item.gold] if spec.choices is not None else LETTERS[item.gold]


def distinct_protocols(spec, protocols: list[str]) -> dict[str, str]:
    """protocol -> the protocol actually scored: one whose prompt, continuations and token boundary are the same as
    an earlier one's is scored once and reported under both. PubMedQA's letter and text prompts are the same, but
    the text protocol tokenizes as lm-evaluation-harness v0.3 (separately, no BOS), so both are scored."""
    from hippocrates.eval.evaluator import PROTOCOL_BOUNDARY
    scored: dict[str, str] = {}
    seen: dict[str, str] = {}
    for protocol in protocols:
        fmt = spec.prompts[protocol]
        key = json.dumps([dataclasses.asdict(fmt), spec.choices is None and fmt.continuation == "letter",
                          PROTOCOL_BOUNDARY[protocol]])
        scored[protocol] = seen.setdefault(key, protocol)
    return scored


def _id_set(path) -> set[str]:
    return {str(x) for x in json.loads(Path(path).read_text())}


def write_if_changed(path: Path, text: str) -> Path:
    """Keep the file (and its mtime, which caches key on) when its content is already this text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path
