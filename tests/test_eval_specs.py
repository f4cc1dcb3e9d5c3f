"""The shipped example specs: 5-option MedQA (JSON Lines) and a headerless MMLU-style CSV, in both protocols, on
small synthetic files of each shape."""
import csv
import dataclasses
import json
import random
from pathlib import Path

import pytest

import hippocrates.eval as eval_pkg
from hippocrates.eval import EvalError, evaluate, load_spec, load_task
from hippocrates.eval.scoring import encode_request, score_requests_reference
from hippocrates.eval.tasks import build_requests
from hippocrates.models import ModelConfig, build_model, load_tokenizer

SPECS = Path(eval_pkg.__file__).parent / "specs"
WORDS = ["aspirin", "heparin", "warfarin", "insulin", "metformin", "atropine", "digoxin", "lithium", "nitrates"]


def synthetic_rows(rng, n, n_options):
    rows = []
    for i in range(n):
        options = rng.sample(WORDS, n_options)
        rows.append({"question": f"Q{i}: which drug, given {rng.choice(WORDS)}?", "options": options,
                     "gold": rng.randrange(n_options)})
    return rows


def write_medqa5(folder: Path, rows):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "test.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"question": r["question"], "answer_idx": "ABCDE"[r["gold"]],
                                "options": dict(zip("ABCDE", r["options"]))}) + "\n")


def write_mmlu_csv(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)  # no header line, as MMLU ships it; quoting of commas as csv does
        for r in rows:
            writer.writerow([r["question"], *r["options"], "ABCD"[r["gold"]]])


def with_data(spec, folder: Path, **paths):
    return dataclasses.replace(spec, base_dir=str(folder), **paths)


@pytest.fixture(scope="module")
def llama_tokenizer(data_dir):
    return load_tokenizer(data_dir / "tokenizers" / "llama2_tokenizer.model")


def tiny_model():
    config = ModelConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
    return build_model(config).init_weights(std=0.2, seed=1).eval()


def test_medqa_5options_both_protocols(tmp_path, llama_tokenizer):
    rng = random.Random(0)
    rows = synthetic_rows(rng, 8, 5)
    write_medqa5(tmp_path / "medqa_5options", rows)
    write_medqa5(tmp_path / "train", synthetic_rows(rng, 6, 5))
    spec = with_data(load_spec(SPECS / "medqa_5options.yaml"), tmp_path,
                     fewshot_data=str(tmp_path / "train" / "test.jsonl"))
    task = load_task(spec)
    first = rows[0]
    letter, text = (build_requests(task, task.items, p)[0] for p in ("letter", "text"))
    assert letter.context == (f"Question: {first['question']}\n"
                              + "".join(f"{k}. {o}\n" for k, o in zip("ABCDE", first["options"])) + "Answer:")
    assert letter.continuations == [" A", " B", " C", " D", " E"] and letter.gold == first["gold"]
    assert text.context == (f"Question: {first['question']}\n"
                            + " ".join(f"({k}) {o}" for k, o in zip("ABCDE", first["options"])) + "\nAnswer:")
    assert text.continuations == [" " + o for o in first["options"]]
    model = tiny_model()
    for protocol in ("letter", "text"):
        run = evaluate(model, llama_tokenizer, [task], protocol=protocol, num_fewshot=2, limit=4, progress=False)
        assert run["results"]["medqa_5options"]["n"] == 4
        assert "train" in run["results"]["medqa_5options"]["fewshot_pool"]
        requests = build_requests(task, task.items[:4], protocol, 2)
        boundary = run["config"]["boundary"]
        encoded = [encode_request(llama_tokenizer, r.context, r.continuations, run["config"]["add_bos"], 512,
                                  boundary) for r in requests]
        expected = score_requests_reference(model, encoded)
        for sample, lls in zip(run["samples"], expected):
            assert len(sample["loglikelihoods"]) == 5
            assert sample["loglikelihoods"] == pytest.approx(lls, abs=1e-4)


def test_mmlu_headerless_csv_both_protocols(tmp_path, llama_tokenizer):
    rng = random.Random(1)
    rows = synthetic_rows(rng, 6, 4)
    rows[0]["question"] = "A question, with a comma and \"quotes\"?"
    write_mmlu_csv(tmp_path / "test" / "clinical_knowledge_test.csv", rows)
    write_mmlu_csv(tmp_path / "dev" / "clinical_knowledge_dev.csv", synthetic_rows(rng, 5, 4))
    spec = with_data(load_spec(SPECS / "mmlu_medical_csv.yaml"), tmp_path)
    task = load_task(spec)
    assert [i.question for i in task.items] == [r["question"] for r in rows]  # no header row eaten
    assert [i.gold for i in task.items] == [r["gold"] for r in rows]
    assert len(task.fewshot_pool) == 5
    letter = build_requests(task, task.items, "letter")[0]
    assert letter.context == (rows[0]["question"] + "\n"
                              + "".join(f"{k}. {o}\n" for k, o in zip("ABCD", rows[0]["options"])) + "Answer:")
    model = tiny_model()
    for protocol in ("letter", "text"):
        run = evaluate(model, llama_tokenizer, [task], protocol=protocol, limit=3, progress=False)
        assert run["results"]["mmlu_clinical_knowledge"]["n"] == 3
        assert all(len(s["loglikelihoods"]) == 4 for s in run["samples"])


def test_headerless_csv_wrong_field_count_names_the_line(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "clinical_knowledge_test.csv").write_text("Q1?,a,b,c,d,A\nQ2?,a,b,c,B\n")
    spec = with_data(load_spec(SPECS / "mmlu_medical_csv.yaml"), tmp_path)
    with pytest.raises(EvalError, match=r"clinical_knowledge_test.csv:line 2: 5 fields where `columns` names 6"):
        load_task(spec)
    (tmp_path / "bad.yaml").write_text("data: x.csv\ncolumns: question\nquestion: q\noptions: [a, b]\nanswer: k\n")
    with pytest.raises(EvalError, match="`columns` must be a list"):
        load_spec(tmp_path / "bad.yaml")
