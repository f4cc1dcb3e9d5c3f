"""eval.decontaminate against a brute-force substring search written independently, on synthetic and real data."""
import json
import random
import re

import pytest

from hippocrates.eval.decontaminate import decontaminate, main, markdown_table

VOCAB = [f"w{i}" for i in range(40)]


def brute_force(item_texts: dict[str, str], train_texts: list[str], n: int) -> set[str]:
    """Items whose normalized word sequence shares n consecutive words with a training text, by substring search."""
    def norm(text):
        return " " + " ".join(re.findall(r"\w+", text.lower())) + " "
    corpus = [norm(t) for t in train_texts]
    hits = set()
    for item_id, text in item_texts.items():
        tokens = norm(text).split()
        windows = [" " + " ".join(tokens[i:i + n]) + " " for i in range(len(tokens) - n + 1)]
        if any(w in c for w in windows for c in corpus):
            hits.add(item_id)
    return hits


def write_task(tmp_path, rng, n_items=12):
    rows = []
    for i in range(n_items):
        rows.append({"id": f"q{i}", "question": " ".join(rng.choice(VOCAB) for _ in range(rng.randint(8, 30))),
                     "options": {k: " ".join(rng.choice(VOCAB) for _ in range(3)) for k in "ABCD"},
                     "answer_idx": "A"})
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "bench.yaml").write_text("name: bench\ndata: test.jsonl\nid: id\nquestion: question\n"
                                         "options: options\nanswer: answer_idx\n")
    return rows


@pytest.mark.parametrize("seed", range(3))
def test_matches_brute_force(tmp_path, seed):
    rng = random.Random(seed)
    n = rng.choice([5, 8, 13])
    rows = write_task(tmp_path, rng)
    train = []
    for _ in range(15):  # copies of item windows (n words, n - 1 words), re-cased and punctuated, inside noise
        row = rng.choice(rows)
        words = row["question"].split()
        take = rng.choice([n, n - 1, n + 2])
        start = rng.randrange(max(1, len(words) - take + 1))
        piece = words[start:start + take]
        noise = [rng.choice(VOCAB) for _ in range(5)]
        train.append(" ".join(noise) + ", " + ". ".join(w.upper() for w in piece) + "! " + " ".join(noise))
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a.jsonl").write_text("".join(json.dumps({"text": t, "meta": [t[:3]]}) + "\n"
                                                        for t in train[:7]))
    (tmp_path / "train" / "b.txt").write_text("\n".join(train[7:11]))
    (tmp_path / "c.csv").write_text("prompt,response\n" + "".join(f"\"{t}\",x\n" for t in train[11:]))
    report = decontaminate([str(tmp_path / "train"), str(tmp_path / "c.csv")], [str(tmp_path / "bench.yaml")], n=n)
    item_texts = {r["id"]: "\n".join([r["question"], *r["options"].values()]) for r in rows}
    got_dir = set(report["sources"][str(tmp_path / "train")]["tasks"]["bench"])
    got_csv = set(report["sources"][str(tmp_path / "c.csv")]["tasks"]["bench"])
    assert got_dir == brute_force(item_texts, train[:11], n)
    assert got_csv == brute_force(item_texts, train[11:], n)
    assert report["sources"][str(tmp_path / "train")]["records"] == 7 + 1
    assert report["splits"]["bench"]["items"] == 12


def test_real_pubmedqa_items_found_in_a_copy(tmp_path, data_dir, capsys):
    """Three PubMedQA test records copied into a training file are found, with nothing else from a clean source."""
    records = json.loads((data_dir / "eval/pubmedqa/ori_pqal.json").read_text())
    test_ids = json.loads((data_dir / "eval/pubmedqa/test_ground_truth.json").read_text())
    leaked = sorted(test_ids)[:3]
    (tmp_path / "leak.jsonl").write_text("".join(json.dumps({"text": " ".join(records[i]["CONTEXTS"])}) + "\n"
                                                 for i in leaked))
    clean = data_dir / "preference" / "liveqa_med_graded_pairs.jsonl"
    assert main(["--train", str(tmp_path / "leak.jsonl"), str(clean), "--tasks", "pubmedqa",
                 "--out", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["sources"][str(tmp_path / "leak.jsonl")]["tasks"]["pubmedqa"] == sorted(leaked, key=int)
    assert report["sources"][str(clean)]["tasks"]["pubmedqa"] == []
    out = capsys.readouterr().out
    assert f"| {tmp_path / 'leak.jsonl'} | 3 | 3 |" in out and markdown_table(report) in out


def test_missing_training_file_is_one_line(tmp_path, capsys):
    assert main(["--train", str(tmp_path / "nope.jsonl"), "--tasks", "pubmedqa"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope.jsonl: no such file" in err
