"""Prompts of the three tasks, character by character, against strings written by hand from the two protocols."""
import dataclasses
import json
from pathlib import Path

import pytest

from hippocrates.eval.tasks import (BUILTIN_TASKS, Item, build_request, build_requests, fewshot_examples, load_task,
                                    with_train_split)

MEDQA_996 = "The only immunoglobulin found as a dimer has what primary function?"
MEDQA_996_OPTIONS = ("Protect against invasive helminth infection", "Protect against viral infections",
                     "Inhibiting bacterial adherance and colonization of mucous membranes",
                     "Provides the most specific recognition to circulating antigens in the bloodstream")


@pytest.fixture(scope="module")
def tasks(data_dir):
    return {name: load_task(name, data_dir=data_dir) for name in ("medqa", "medmcqa", "pubmedqa")}


def item(task, item_id):
    return next(i for i in task.items if i.id == item_id)


def test_split_sizes_and_gold(tasks):
    assert [len(tasks[n].items) for n in ("medqa", "medmcqa", "pubmedqa")] == [1273, 4183, 500]
    assert len(tasks["medqa"].fewshot_pool) == 1272 and len(tasks["pubmedqa"].fewshot_pool) == 500
    pool_ids = {i.id for i in tasks["pubmedqa"].fewshot_pool}
    assert not pool_ids & {i.id for i in tasks["pubmedqa"].items}
    golds = [i.gold for i in tasks["pubmedqa"].items]
    assert (golds.count(0), golds.count(1), golds.count(2)) == (276, 169, 55)  # yes / no / maybe in the test split
    assert item(tasks["medqa"], "996").gold == 2  # answer_idx "C"
    assert item(tasks["medmcqa"], "45258d3d-b974-44dd-a161-c3fccbdadd88").gold == 0  # cop 1 (1-based) -> A


def test_medqa_letter(tasks):
    req = build_request(tasks["medqa"], item(tasks["medqa"], "996"), "letter")
    assert req.context == (
        "Question: The only immunoglobulin found as a dimer has what primary function?\n"
        "A. Protect against invasive helminth infection\n"
        "B. Protect against viral infections\n"
        "C. Inhibiting bacterial adherance and colonization of mucous membranes\n"
        "D. Provides the most specific recognition to circulating antigens in the bloodstream\n"
        "Answer:")
    assert req.continuations == [" A", " B", " C", " D"] and req.gold == 2


def test_medqa_text(tasks):
    req = build_request(tasks["medqa"], item(tasks["medqa"], "996"), "text")
    assert req.context == (
        "Question: The only immunoglobulin found as a dimer has what primary function?\n"
        "(A) Protect against invasive helminth infection (B) Protect against viral infections "
        "(C) Inhibiting bacterial adherance and colonization of mucous membranes "
        "(D) Provides the most specific recognition to circulating antigens in the bloodstream\n"
        "Answer:")
    assert req.continuations == [" Protect against invasive helminth infection", " Protect against viral infections",
                                 " Inhibiting bacterial adherance and colonization of mucous membranes",
                                 " Provides the most specific recognition to circulating antigens in the bloodstream"]
    assert req.labels == [c[1:] for c in req.continuations]


def test_medmcqa_letter_and_text(tasks):
    it = item(tasks["medmcqa"], "45258d3d-b974-44dd-a161-c3fccbdadd88")
    letter = build_request(tasks["medmcqa"], it, "letter")
    assert letter.context == (
        "Question: Which of the following is not true for myelinated nerve fibers:\n"
        "Choices:\n"
        "A. Impulse through myelinated fibers is slower than non-myelinated fibers\n"
        "B. Membrane currents are generated at nodes of Ranvier\n"
        "C. Saltatory conduction of impulses is seen\n"
        "D. Local anesthesia is effective only when the nerve is not covered by myelin sheath\n"
        "Answer:")
    assert letter.continuations == [" A", " B", " C", " D"] and letter.gold == 0
    text = build_request(tasks["medmcqa"], it, "text")
    assert text.context == (
        "Question: Which of the following is not true for myelinated nerve fibers:\n"
        "(A) Impulse through myelinated fibers is slower than non-myelinated fibers "
        "(B) Membrane currents are generated at nodes of Ranvier "
        "(C) Saltatory conduction of impulses is seen "
        "(D) Local anesthesia is effective only when the nerve is not covered by myelin sheath\n"
        "Answer:")
    assert text.continuations[0] == " Impulse through myelinated fibers is slower than non-myelinated fibers"


def test_pubmedqa_same_in_both_protocols(tasks):
    it = item(tasks["pubmedqa"], "21214884")
    expected = (
        "Abstract: Using polymerase chain reaction techniques, we evaluated the presence of HPV infection in human "
        "breast milk collected from 21 HPV-positive and 11 HPV-negative mothers.\n"
        "Of the 32 studied human milk specimens, no 'high-risk' HPV 16, 18, 31, 33, 35, 39, 45, 51, 52, 56, 58 or 58 "
        "DNA was detected.\n"
        "Question: Can 'high-risk' human papillomaviruses (HPVs) be detected in human breast milk?\n"
        "Answer:")
    for protocol in ("letter", "text"):
        req = build_request(tasks["pubmedqa"], it, protocol)
        assert req.context == expected
        assert req.continuations == [" yes", " no", " maybe"] and req.gold == 1


def test_fewshot_layout(tasks):
    """Examples as prompt + " " + gold answer, each followed by a blank line, then the item's prompt."""
    example = Item(id="x", question="Which vitamin deficiency causes scurvy?", choices=["A", "C", "D", "K"], gold=1)
    task = dataclasses.replace(tasks["medqa"], fewshot_pool=[example])
    it = item(tasks["medqa"], "996")
    letter = build_request(task, it, "letter", num_fewshot=1)
    assert letter.context == (
        "Question: Which vitamin deficiency causes scurvy?\nA. A\nB. C\nC. D\nD. K\nAnswer: B\n\n"
        "Question: The only immunoglobulin found as a dimer has what primary function?\n"
        "A. Protect against invasive helminth infection\n"
        "B. Protect against viral infections\n"
        "C. Inhibiting bacterial adherance and colonization of mucous membranes\n"
        "D. Provides the most specific recognition to circulating antigens in the bloodstream\n"
        "Answer:")
    text = build_request(task, it, "text", num_fewshot=1)
    assert text.context.startswith(
        "Question: Which vitamin deficiency causes scurvy?\n(A) A (B) C (C) D (D) K\nAnswer: C\n\n"
        "Question: The only immunoglobulin found as a dimer has what primary function?\n(A) Protect against")


def test_fewshot_seeded_and_never_the_item(tasks):
    task = tasks["medmcqa"]  # its pool is the evaluated set itself
    small = dataclasses.replace(task, fewshot_pool=task.items[:4])
    for it in small.fewshot_pool:
        shots = fewshot_examples(small, it, 3, seed=1)
        assert it.id not in {s.id for s in shots} and len({s.id for s in shots}) == 3
    it = task.items[10]
    first = [s.id for s in fewshot_examples(task, it, 5, seed=1)]
    assert first == [s.id for s in fewshot_examples(task, it, 5, seed=1)]
    assert first != [s.id for s in fewshot_examples(task, it, 5, seed=2)]
    limited = load_task("medmcqa", limit=20)  # a --limit run draws the same examples for the same item
    assert [s.id for s in fewshot_examples(limited, limited.items[10], 5, seed=1)] == first


# ---- few-shot prompts against lm-evaluation-harness 0.4's own task configs and sampler ----

def lm_eval_task(yaml_name: str, tmp_path, splits: dict[str, list[dict]]):
    """lm-eval's ConfigurableTask from its own YAML (doc_to_text, target, choices, sampler), its dataset swapped for
    local JSON Lines files of the hub layout it expects."""
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml
    config = load_yaml(Path(lm_eval.__file__).parent / "tasks" / yaml_name)
    files = {}
    for split, rows in splits.items():
        files[split] = str(tmp_path / f"lm_eval_{split}.jsonl")
        Path(files[split]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = dict(config, dataset_path="json", dataset_name=None,
                  dataset_kwargs={"data_files": files, "cache_dir": str(tmp_path / "hf_cache")})
    task = ConfigurableTask(config=config)
    task.set_fewshot_seed(1234)  # what lm_eval.simple_evaluate does with its default fewshot_random_seed
    return task


def jsonl_lines(path, start, stop):
    return [json.loads(line) for line in Path(path).read_text().splitlines()[start:stop]]


def medqa_hub(row):  # GBaker/MedQA-USMLE-4-options-hf
    return {"sent1": row["question"], **{f"ending{i}": row["options"][k] for i, k in enumerate("ABCD")},
            "label": "ABCD".index(row["answer_idx"])}


def medmcqa_hub(row):  # openlifescienceai/medmcqa: cop is 0-based there
    return {**{k: row[k] for k in ("id", "question", "opa", "opb", "opc", "opd")}, "cop": row["cop"] - 1}


@pytest.mark.parametrize("name", ["medqa", "medmcqa", "pubmedqa"])
def test_fewshot_prompts_equal_lm_eval_byte_for_byte(name, data_dir, tmp_path):
    """A local train split given: every 5-shot letter prompt is lm-eval 0.4's, character for character."""
    n_items, shots = 6, 5
    if name == "medqa":
        train = jsonl_lines(data_dir / "eval/medqa/dev.jsonl", 0, 14)  # stands in for MedQA's train split
        (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
        test = jsonl_lines(data_dir / "eval/medqa/test.jsonl", 0, n_items)
        hub_rows = {"train": [medqa_hub(r) for r in train], "test": [medqa_hub(r) for r in test]}
        lm_task = lm_eval_task("medqa/medqa.yaml", tmp_path, {**hub_rows, "validation": hub_rows["train"][:1]})
        train_file = tmp_path / "train.jsonl"
    elif name == "medmcqa":
        train = jsonl_lines(data_dir / "eval/medmcqa/dev.jsonl", 100, 114)
        (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
        test = jsonl_lines(data_dir / "eval/medmcqa/dev.jsonl", 0, n_items)
        lm_task = lm_eval_task("medmcqa/medmcqa.yaml", tmp_path, {"train": [medmcqa_hub(r) for r in train],
                                                                 "validation": [medmcqa_hub(r) for r in test]})
        train_file = tmp_path / "train.jsonl"
    else:
        records = json.loads((data_dir / "eval/pubmedqa/ori_pqal.json").read_text())
        test_ids = json.loads((data_dir / "eval/pubmedqa/test_ground_truth.json").read_text())
        fold = {k: v for k, v in records.items() if k not in test_ids}
        train = dict(list(fold.items())[:14])  # stands in for fold 0's train split, ori_pqal's layout
        (tmp_path / "train.json").write_text(json.dumps(train))
        test = [records[k] for k in records if k in test_ids][:n_items]
        lm_task = lm_eval_task("pubmedqa/pubmedqa.yaml", tmp_path,
                               {"train": list(train.values()), "validation": list(train.values())[:1], "test": test})
        train_file = tmp_path / "train.json"
    task = load_task(with_train_split(BUILTIN_TASKS[name], str(train_file)), data_dir=data_dir, limit=n_items)
    assert task.fewshot_pool_name.startswith(f"train split: {train_file}")
    ours = build_requests(task, task.items, "letter", shots, seed=1234)
    theirs = [lm_task.fewshot_context(doc, shots) for doc in lm_task.eval_docs]  # in document order, as lm-eval
    assert len(theirs) == n_items
    for mine, expected in zip(ours, theirs):
        assert mine.context == expected
    assert len({r.context.split("\n\n")[0] for r in ours}) > 1  # the draws differ from item to item
