"""train.pipeline: held-out items, SFT evaluation instructions, the report's numbers, and a tiny run end to end
(real SmolLM2, real data, every stage a real subprocess) that a second invocation skips."""
import json
import math
import random
from pathlib import Path

import pytest

from hippocrates.eval.tasks import build_request, load_spec, load_task
from hippocrates.train.heldout import distinct_protocols, select_heldout
from hippocrates.train.pipeline import PipelineError, load_pipeline_config, main
from hippocrates.train.report import write_report
from hippocrates.train.sft_data import normalize, benchmark_test_questions, write_eval_instructions


# ---------------------------------------------------------------------------------------------------------------
# held-out items and SFT data


def test_heldout_is_a_seeded_subset_of_the_test_split(tmp_path, data_dir):
    a = select_heldout(["medqa", "pubmedqa"], {"medqa": 30, "pubmedqa": 40}, 7, data_dir, tmp_path / "a")
    b = select_heldout(["medqa", "pubmedqa"], {"medqa": 30, "pubmedqa": 40}, 7, data_dir, tmp_path / "b")
    c = select_heldout(["medqa", "pubmedqa"], {"medqa": 30, "pubmedqa": 40}, 8, data_dir, tmp_path / "c")
    assert a["medqa"]["ids"] == b["medqa"]["ids"] and a["medqa"]["ids"] != c["medqa"]["ids"]
    test_pmids = set(json.loads((data_dir / "eval/pubmedqa/test_ground_truth.json").read_text()))
    assert len(a["pubmedqa"]["ids"]) == 40 and set(a["pubmedqa"]["ids"]) <= test_pmids
    task = load_task(a["pubmedqa"]["spec"])
    assert [item.id for item in task.items] == a["pubmedqa"]["ids"]
    assert not {item.id for item in task.fewshot_pool} & test_pmids  # no test item can become a few-shot example
    gold = json.loads((data_dir / "eval/pubmedqa/test_ground_truth.json").read_text())
    labels = [gold[i] for i in a["pubmedqa"]["ids"]]
    top = max(set(labels), key=labels.count)
    assert a["pubmedqa"]["majority"] == pytest.approx(labels.count(top) / 40)
    assert a["pubmedqa"]["chance"] == pytest.approx(1 / 3) and a["medqa"]["chance"] == pytest.approx(1 / 4)
    assert distinct_protocols(load_spec(a["pubmedqa"]["spec"]), ["letter", "text"]) == {"letter": "letter",
                                                                                      "text": "text"}
    assert distinct_protocols(load_spec(a["medqa"]["spec"]), ["letter", "text"]) == {"letter": "letter",
                                                                                   "text": "text"}


def test_eval_instructions_are_the_eval_prompt_on_non_test_items(tmp_path, data_dir):
    path = tmp_path / "ei.jsonl"
    tests = benchmark_test_questions(["medqa", "medmcqa", "pubmedqa"], data_dir)
    summary = write_eval_instructions({"medqa": 20, "pubmedqa": None}, ["letter", "text"], tests, 3, data_dir, path)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert summary["pubmedqa"]["records"] == 500 and summary["medqa"]["records"] == 40
    test_pmids = set(json.loads((data_dir / "eval/pubmedqa/test_ground_truth.json").read_text()))
    pubmed = [r for r in records if r["source"].startswith("pubmedqa")]
    assert not {r["id"] for r in pubmed} & test_pmids
    medqa = load_task("medqa", data_dir)
    dev = {item.id: item for item in medqa.fewshot_pool}
    for record in random.Random(0).sample([r for r in records if r["source"].startswith("medqa")], 10):
        protocol = record["source"].split("/")[1]
        request = build_request(medqa, dev[record["id"]], protocol)
        assert record["instruction"] == request.context and record["input"] == ""
        assert record["output"] == request.continuations[request.gold]
        assert normalize(dev[record["id"]].question) not in tests
    assert {r["output"] for r in pubmed} == {" yes", " no", " maybe"}


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(PipelineError, match="unknown key 'colour'"):
        load_pipeline_config(None, ["colour=red"])
    with pytest.raises(PipelineError, match="unknown stage 'ppo'"):
        load_pipeline_config(None, [], stages="cpt,ppo")
    with pytest.raises(PipelineError, match="sft.data.path"):
        load_pipeline_config(None, ["sft.data.path=x.jsonl"])
    config = load_pipeline_config(None, ["sft_data.general.instruct/chatdoctor_genmedgpt5k.json=3",
                                         "cpt.lora.rank=4", "eval.limit.medqa=7"])
    assert config.sft_data.general["instruct/chatdoctor_genmedgpt5k.json"] == 3
    assert config.cpt["lora"]["rank"] == 4 and config.limit_of("medqa") == 7
    bad = tmp_path / "p.yaml"
    bad.write_text("cpt: [1, 2]\n")
    with pytest.raises(PipelineError, match="p.yaml: cpt must be a mapping"):
        load_pipeline_config(str(bad))


def test_test_split_is_refused_as_training_data(tmp_path, capsys):
    code = main(["--stages", "cpt", f"run_dir={tmp_path}", "cpt.data.path=eval/pubmedqa/ori_pqal.json:text=QUESTION",
                 "eval.limit=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "evaluated split" in err[-1] and "ori_pqal.json" in err[-1]
    assert not (tmp_path / "cpt" / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------------------------
# the report's arithmetic on a made-up run


def fake_results(path: Path, scores: dict):
    path.mkdir(parents=True)
    results = {task: {"n": n, "acc": acc, "acc_stderr": math.sqrt(acc * (1 - acc) / (n - 1)), "acc_norm": acc / 2,
                      "acc_norm_stderr": 0.01} for task, (acc, n) in scores.items()}
    (path / "results.json").write_text(json.dumps({"config": {}, "results": results}))
    samples = [{"task": task, "id": str(i), "acc": float(i < round(acc * n))}  # the first acc * n items right
               for task, (acc, n) in scores.items() for i in range(n)]
    (path / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))


def test_report_moves_and_baselines(tmp_path):
    run = tmp_path
    heldout = {"pubmedqa": {"n": 200, "chance": 1 / 3, "majority": 0.55, "majority_label": "yes", "ids": []},
               "medqa": {"n": 100, "chance": 0.25, "majority": 0.3, "majority_label": "C", "ids": []}}
    acc = {"base": {"pubmedqa": 0.40, "medqa": 0.26}, "sft": {"pubmedqa": 0.68, "medqa": 0.27}}
    evals = {}
    for label, tasks in acc.items():
        fake_results(run / "eval" / label / "letter", {t: (a, heldout[t]["n"]) for t, a in tasks.items()})
        evals[label] = {"letter": {"dir": str(run / "eval" / label / "letter"), "wall_s": 12.0}}
    (run / "sft").mkdir()
    (run / "sft" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 2.0 / s, "tokens_per_s": 100.0, "step_time_s": 2.0}) + "\n" for s in (1, 2, 3)))
    state = {"heldout": heldout, "protocols": {"medqa": {"letter": "letter"}, "pubmedqa": {"letter": "letter"}},
             "stages": {"sft": {"input": "base", "out_dir": str(run / "sft"), "wall_s": 30.0, "status": "trained"}},
             "evals": evals, "config": {"run_dir": str(run)}}
    (run / "pipeline_state.json").write_text(json.dumps(state))
    report = write_report(run)

    moves = {m["column"]: m for m in report["moves"]}
    pub = moves["pubmedqa/letter"]
    assert pub["diff"] == pytest.approx(0.28)
    # sft is right on the 80 items base gets plus 56 more: McNemar's p = 2 * 0.5^56
    assert (pub["only_before"], pub["only_after"]) == (0, 56) and pub["p"] == pytest.approx(2 * 0.5 ** 56)
    assert pub["ci_low"] < 0.28 < pub["ci_high"]
    assert moves["medqa/letter"]["p"] == 1.0  # one item apart
    assert pub["moved"] == "up" and moves["medqa/letter"]["moved"] == "no"
    beats = {(v["model"], v["column"], v["baseline_name"]): v["beats"] for v in report["vs_baselines"]}
    assert beats[("sft", "pubmedqa/letter", "majority")] is True           # 68 > 55 + 2 x 3.3
    assert beats[("base", "pubmedqa/letter", "majority")] is False
    assert beats[("sft", "medqa/letter", "chance")] is False               # 27 vs 25 with se 4.5
    assert report["stages"]["sft"]["tokens"] == 600 and report["stages"]["sft"]["steps"] == 3
    md = (run / "report.md").read_text()
    assert "| sft | 27.0 ± 4.5 | 68.0 ± 3.3 |" in md
    assert "| majority class | 30.0 (C) | 55.0 (yes) |" in md
    assert "beats both (McNemar p < 0.05 against base" in md
    assert (run / "loss_curves.png").stat().st_size > 1000
    assert json.loads((run / "report.json").read_text())["scores"]["sft"]["pubmedqa/letter"]["acc"] == 0.68


# ---------------------------------------------------------------------------------------------------------------
# a tiny pipeline, end to end, twice

TINY = ["cpt.max_steps=1", "cpt.seq_len=32", "cpt.batch_size=1", "cpt.data.limit=20", "cpt.checkpoint.save_every=1",
        "sft.max_steps=1", "sft.batch_size=1", "sft.seq_len=384",
        "sft_data.general.instruct/chatdoctor_genmedgpt5k.json=2",
        "sft_data.general.instruct/medalpaca_medical_meadow_small.json=2",
        "sft_data.general.corpus/medquad_qa.jsonl:instruction=question,output=answer=2",
        "sft_data.eval_instructions.medqa=3", "sft_data.eval_instructions.pubmedqa=3",
        "dpo.max_steps=1", "dpo.batch_size=1", "dpo.seq_len=160", "dpo.data.limit=40",
        "eval.limit=2", "eval.protocols=[letter]"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, smollm2_dir):
    run_dir = tmp_path_factory.mktemp("pipeline")
    args = [f"run_dir={run_dir}", *TINY]
    assert main(args) == 0
    return run_dir, args


def test_tiny_pipeline_report_matches_results(tiny_run):
    run_dir, _ = tiny_run
    for name in ("report.md", "report.json", "loss_curves.png", "dpo_rewards.png"):
        assert (run_dir / name).is_file(), name
    report = json.loads((run_dir / "report.json").read_text())
    state = json.loads((run_dir / "pipeline_state.json").read_text())
    assert report["models"] == ["base", "cpt", "sft", "dpo"]
    assert [state["stages"][s]["input"] for s in ("cpt", "sft", "dpo")] == ["base", "cpt", "sft"]
    md = (run_dir / "report.md").read_text()
    for label in report["models"]:
        results = json.loads((run_dir / "eval" / label / "letter" / "results.json").read_text())["results"]
        samples = [json.loads(line) for line in (run_dir / "eval" / label / "letter" / "samples.jsonl").open()]
        row = [label]
        for task in ("medqa", "medmcqa", "pubmedqa"):
            ours = report["scores"][label][f"{task}/letter"]
            assert ours["acc"] == results[task]["acc"] and ours["n"] == results[task]["n"] == 2
            assert [s["id"] for s in samples if s["task"] == task] == state["heldout"][task]["ids"]  # same items
            row.append(f"{100 * results[task]['acc']:.1f} ± {100 * results[task]['acc_stderr']:.1f}")
        assert "| " + " | ".join(row) + " |" in md
    for stage in ("cpt", "sft", "dpo"):
        metrics = [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").open()]
        assert report["stages"][stage]["steps"] == metrics[-1]["step"] and report["stages"][stage]["wall_s"] > 0
        assert f"### {stage} (`{run_dir / stage}/config.yaml`)" in md
    moved = {(m["stage"], m["column"]) for m in report["moves"]}
    assert ("sft", "pubmedqa/letter") in moved and ("dpo", "medqa/letter") in moved
    assert "## Decontamination" in md
    for stage in ("cpt", "sft", "dpo"):
        contamination = state["decontamination"][stage]
        assert set(contamination["splits"]) == {"medqa", "medmcqa", "pubmedqa"} and contamination["sources"]
        assert f"### {stage}" in md and f"| {next(iter(contamination['sources']))} |" in md
    lines = (run_dir / "data" / "sft_eval_instructions.jsonl").read_text().splitlines()
    assert len(lines) == 6


def test_tiny_pipeline_second_run_skips_everything(tiny_run):
    run_dir, args = tiny_run
    final = run_dir / "sft" / "final" / "model.safetensors"
    results = run_dir / "eval" / "dpo" / "letter" / "results.json"
    before = final.stat().st_mtime_ns, results.stat().st_mtime_ns
    assert main(args) == 0
    assert (final.stat().st_mtime_ns, results.stat().st_mtime_ns) == before
    state = json.loads((run_dir / "pipeline_state.json").read_text())
    assert all(s["status"].startswith("skipped") for s in state["stages"].values())
    assert all(e["status"].startswith("skipped") for by_protocol in state["evals"].values()
               for e in by_protocol.values())
    assert state["total_wall_s"] < 60


@pytest.mark.parametrize("name, stages", [("pipeline_hippo_llama.yaml", ["cpt", "sft"]),
                                          ("pipeline_hippo_mistral.yaml", ["sft"])])
def test_paper_scale_configs_resolve(tmp_path, name, stages):
    """Every stage config of the GPU recipes passes the trainer's own key check (engine.dryrun runs them in full:
    python -m hippocrates.train.pipeline --config train/configs/NAME --dry-run)."""
    from hippocrates.train.pipeline import ROOT, Pipeline
    config = load_pipeline_config(str(ROOT / "train" / "configs" / name), [f"run_dir={tmp_path}"])
    pipeline = Pipeline(config)
    assert [s for s in ("cpt", "sft", "dpo") if s in config.stages] == stages and config.nproc == 8
    for stage in stages:
        resolved = pipeline.resolve(stage, pipeline.stage_config(stage, config.model, ["x.jsonl"]))
        assert resolved.lora.rank > 0 and resolved.seq_len >= 2048 and resolved.model == config.model
    assert config.eval.limit is None and config.sft_data.eval_instructions == {"medqa": None, "pubmedqa": None}
