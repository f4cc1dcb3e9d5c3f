"""The report of a pipeline run: report.md (tables), report.json (the same numbers), loss and DPO reward curves.

    python -m hippocrates.train.report RUN_DIR        # rebuild the report from what the run dir holds

Reads RUN_DIR/pipeline_state.json (written by train/pipeline.py), each evaluation's results.json and samples.jsonl,
each stage's metrics.jsonl and config.yaml. Every "stage X vs stage Y" claim is eval.compare's test on the same
items: a stage "moved" a benchmark when McNemar's exact test on per-item correctness against the model it started
from gives p < ALPHA (up or down by the sign of the difference), shown with the paired bootstrap 95% interval of the
difference. A model beats a baseline when its accuracy exceeds it by more than two of its own standard errors (the
baseline is a constant of the evaluated items).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import yaml

from hippocrates.eval.compare import paired_comparison

ALPHA = 0.05  # McNemar's p below which a stage "moved" a benchmark
STATE_FILE = "pipeline_state.json"
TASK_TITLES = {"medqa": "MedQA", "medmcqa": "MedMCQA", "pubmedqa": "PubMedQA"}
DPO_CURVES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


class ReportError(ValueError):
    """A run dir the report cannot read; the message names the file."""


# ---------------------------------------------------------------------------------------------------------------
# reading


def read_results(path: Path) -> dict[str, dict]:
    """results.json -> {task: {acc, acc_norm, stderr, acc_norm_stderr, n}} (the evaluator's numbers, unchanged)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ReportError(f"{path}: cannot read results ({err})") from None
    tasks = raw.get("results", raw) if isinstance(raw, dict) else None
    if not isinstance(tasks, dict):
        raise ReportError(f"{path}: expected an object of per-task results")
    out = {}
    for task, scores in tasks.items():
        if not isinstance(scores, dict) or "acc" not in scores:
            continue
        n = scores.get("n", scores.get("num_items"))
        stderr = scores.get("stderr", scores.get("acc_stderr"))
        if stderr is None and n:
            stderr = binomial_stderr(scores["acc"], n)
        out[task] = {"acc": scores["acc"], "acc_norm": scores.get("acc_norm"), "stderr": stderr,
                     "acc_norm_stderr": scores.get("acc_norm_stderr"), "n": n, "dtype": scores.get("dtype"),
                     "num_fewshot": scores.get("num_fewshot", 0), "fewshot_pool": scores.get("fewshot_pool")}
    return out


def binomial_stderr(p: float, n: int) -> float:
    """lm-evaluation-harness's standard error of a mean of 0/1 scores: sqrt(p (1 - p) / (n - 1))."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage_totals(records: list[dict]) -> dict:
    """Steps, tokens processed (rows x seq_len per step, padding included) and training seconds from metrics."""
    records = [r for r in records if "loss" in r]
    tokens = sum(r.get("tokens_per_s", 0) * r.get("step_time_s", 0) for r in records)
    train_s = sum(r.get("step_time_s", 0) for r in records)
    return {"steps": records[-1]["step"] if records else 0, "tokens": round(tokens), "train_s": train_s}


# ---------------------------------------------------------------------------------------------------------------
# numbers


def columns(state: dict) -> list[dict]:
    """One column per (task, distinct protocol): {"task", "protocol" (scored), "protocols" (reported under)}."""
    cols = []
    for task, mapping in state["protocols"].items():
        for scored in dict.fromkeys(mapping.values()):
            cols.append({"task": task, "protocol": scored, "protocols": [p for p, s in mapping.items() if s == scored],
                         "key": f"{task}/{scored}"})
    return cols


def collect_scores(run_dir: Path, state: dict) -> dict[str, dict[str, dict]]:
    """{model label: {column key: scores}} for every evaluation that finished."""
    scores: dict[str, dict[str, dict]] = {}
    for label, by_protocol in state.get("evals", {}).items():
        for protocol, info in by_protocol.items():
            results = Path(info["dir"]) / "results.json"
            if not results.is_file():
                continue
            for task, value in read_results(results).items():
                scores.setdefault(label, {})[f"{task}/{protocol}"] = value
    return scores


def collect_correct(state: dict) -> dict[str, dict[str, dict[str, float]]]:
    """{model label: {column key: {item id: acc}}} from each evaluation's samples.jsonl."""
    correct: dict[str, dict[str, dict[str, float]]] = {}
    for label, by_protocol in state.get("evals", {}).items():
        for protocol, info in by_protocol.items():
            samples = Path(info["dir"]) / "samples.jsonl"
            if not samples.is_file():
                continue
            for line in samples.read_text().splitlines():
                if line.strip():
                    s = json.loads(line)
                    correct.setdefault(label, {}).setdefault(f"{s['task']}/{protocol}", {})[str(s["id"])] = s["acc"]
    return correct


def compare(before: dict, after: dict, before_items: dict | None, after_items: dict | None) -> dict:
    """eval.compare's paired test of two evaluations of a column: McNemar's p and the bootstrap CI of after - before."""
    out = {"before": before["acc"], "after": after["acc"], "diff": after["acc"] - before["acc"]}
    if not before_items or not after_items or set(before_items) != set(after_items):
        return {**out, "p": None, "ci_low": None, "ci_high": None, "moved": "n/a (no per-item samples of the same "
                                                                           "items)"}
    ids = sorted(before_items)
    c = paired_comparison([before_items[i] for i in ids], [after_items[i] for i in ids])
    moved = "no" if c["mcnemar_p"] >= ALPHA else "up" if c["diff"] > 0 else "down"
    return {**out, "p": c["mcnemar_p"], "ci_low": c["ci_low"], "ci_high": c["ci_high"],
            "only_before": c["mcnemar_b"], "only_after": c["mcnemar_c"], "moved": moved}


def versus_baseline(score: dict, baseline: float) -> dict:
    diff = score["acc"] - baseline
    return {"acc": score["acc"], "baseline": baseline, "diff": diff, "two_se": 2 * score["stderr"],
            "beats": diff > 2 * score["stderr"]}


def build(run_dir: Path) -> dict:
    """Everything report.md shows, as one JSON-ready dict."""
    run_dir = Path(run_dir)
    state_path = run_dir / STATE_FILE
    if not state_path.is_file():
        raise ReportError(f"{state_path}: no pipeline state (run python -m hippocrates.train.pipeline first)")
    state = json.loads(state_path.read_text())
    cols = columns(state)
    scores = collect_scores(run_dir, state)
    correct = collect_correct(state)
    models = [label for label in ["base", *state.get("stages", {})] if label in scores]

    moves = []
    for stage, info in state.get("stages", {}).items():
        source = info.get("input")
        if stage not in scores or source not in scores:
            continue
        for col in cols:
            if col["key"] in scores[stage] and col["key"] in scores[source]:
                moves.append({"stage": stage, "from": source, "column": col["key"],
                              **compare(scores[source][col["key"]], scores[stage][col["key"]],
                                        correct.get(source, {}).get(col["key"]),
                                        correct.get(stage, {}).get(col["key"]))})
    vs_baselines = []
    for label in models:
        for col in cols:
            score = scores[label].get(col["key"])
            heldout = state["heldout"].get(col["task"])
            if score is None or heldout is None:
                continue
            for name in ("chance", "majority"):
                vs_baselines.append({"model": label, "column": col["key"], "baseline_name": name,
                                     **versus_baseline(score, heldout[name])})
    stages = {}
    for stage, info in state.get("stages", {}).items():
        out_dir = Path(info["out_dir"])
        totals = stage_totals(read_metrics(out_dir / "metrics.jsonl"))
        config_file = out_dir / "config.yaml"
        stages[stage] = {**info, **totals,
                         "resolved_config": config_file.read_text() if config_file.is_file() else None}
    return {"run_dir": str(run_dir), "columns": cols, "models": models, "scores": scores,
            "heldout": {t: {k: v for k, v in h.items() if k != "ids"} for t, h in state["heldout"].items()},
            "moves": moves, "vs_baselines": vs_baselines, "correct": correct, "stages": stages,
            "evals": state.get("evals", {}),
            "sft_data": state.get("sft_data"), "pipeline_config": state.get("config"),
            "decontamination": {stage: {k: v for k, v in d.items() if k != "signature"}
                                for stage, d in state.get("decontamination", {}).items()},
            "total_wall_s": state.get("total_wall_s")}


# ---------------------------------------------------------------------------------------------------------------
# writing


def pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def column_title(col: dict, n_protocols: dict[str, int]) -> str:
    title = TASK_TITLES.get(col["task"], col["task"])
    if n_protocols[col["task"]] > 1 or len(col["protocols"]) > 1:
        title += " " + " = ".join(col["protocols"])
    return title


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes} min {s:02d} s" if minutes else f"{s} s"


def render_markdown(report: dict) -> str:
    cols = report["columns"]
    n_protocols = {}
    for col in cols:
        n_protocols[col["task"]] = n_protocols.get(col["task"], 0) + 1
    titles = [column_title(c, n_protocols) for c in cols]
    out = [f"# Hippocrates pipeline report: {report['run_dir']}", ""]

    out += ["## Accuracy on the held-out items", "",
            "Accuracy in % ± one standard error, on the same seeded subset of each benchmark's test split "
            "for every model. Protocols: `letter` scores \" A\"..\" D\" after the lettered options "
            "(lm-evaluation-harness), `text` scores each option's text (the Hippocrates paper); PubMedQA scores "
            "yes / no / maybe in both, so it is scored once. Baselines are computed from the evaluated items.", ""]
    rows = []
    for label in report["models"]:
        row = [label]
        for col in cols:
            s = report["scores"][label].get(col["key"])
            row.append("" if s is None else f"{pct(s['acc'])} ± {pct(s['stderr'])}")
        rows.append(row)
    heldout = report["heldout"]
    rows.append(["chance"] + [pct(heldout[c["task"]]["chance"]) if c["task"] in heldout else "" for c in cols])
    rows.append(["majority class"] + [f"{pct(heldout[c['task']]['majority'])} ({heldout[c['task']]['majority_label']})"
                                      if c["task"] in heldout else "" for c in cols])
    rows.append(["items (n)"] + [str(heldout[c["task"]]["n"]) if c["task"] in heldout else "" for c in cols])
    out += [table(["model"] + titles, rows), ""]

    pools = sorted({f"- {title}: {s['num_fewshot']}-shot, examples from {s['fewshot_pool']}"
                    for label in report["models"] for col, title in zip(cols, titles)
                    if (s := report["scores"][label].get(col["key"])) and s.get("num_fewshot")
                    and s.get("fewshot_pool")})
    if pools:
        out += ["Few-shot pools (lm-eval draws from each benchmark's train split; where none was given, this pool "
                "was used instead):", "", *pools, ""]

    norm_rows = []
    for label in report["models"]:
        values = [report["scores"][label].get(c["key"], {}).get("acc_norm") for c in cols]
        if any(v is not None for v in values):
            norm_rows.append([label] + [pct(v) if v is not None else "" for v in values])
    if norm_rows:
        out += ["Length-normalized accuracy (acc_norm, %):", "", table(["model"] + titles, norm_rows), ""]

    title_of = dict(zip([c["key"] for c in cols], titles))
    out += ["## Did each stage move each benchmark?", "",
            "Difference from the model the stage started from, in points, on the same items, with its paired "
            f"bootstrap 95% interval; moved = McNemar's exact test on per-item correctness gives p < {ALPHA} "
            "(`python -m hippocrates.eval.compare` on the two evaluation dirs gives the same numbers).", ""]
    out += [table(["stage (from)", "benchmark", "before", "after", "difference", "95% CI", "McNemar p", "moved"],
                  [[f"{m['stage']} ({m['from']})", title_of[m["column"]], pct(m["before"]), pct(m["after"]),
                    f"{100 * m['diff']:+.1f}", ci_text(m), "n/a" if m["p"] is None else f"{m['p']:.3g}",
                    m["moved"]] for m in report["moves"]])
            if report["moves"] else "(no stage has both its own and its input's evaluation)", ""]

    out += ["## Against the baselines", "",
            "Accuracy minus the baseline, in points; beats = more than 2 standard errors of the model's accuracy "
            "above it.", ""]
    base_rows = []
    for label in report["models"]:
        for col in cols:
            found = {v["baseline_name"]: v for v in report["vs_baselines"]
                     if v["model"] == label and v["column"] == col["key"]}
            if found:
                c, m = found["chance"], found["majority"]
                base_rows.append([label, title_of[col["key"]], pct(c["acc"]), f"{100 * c['diff']:+.1f}",
                                  "yes" if c["beats"] else "no", f"{100 * m['diff']:+.1f}",
                                  "yes" if m["beats"] else "no", f"{100 * m['two_se']:.1f}"])
    out += [table(["model", "benchmark", "acc", "vs chance", "beats chance", "vs majority", "beats majority",
                   "2 se"], base_rows) if base_rows else "(no evaluations)", ""]
    out += verdict_lines(report, title_of)

    out += ["## Training curves", "", "![loss curves](loss_curves.png)", ""]
    if "dpo_rewards.png" in report.get("files", {}):
        out += ["![DPO rewards](dpo_rewards.png)", ""]

    out += ["## Time and tokens", "",
            "Wall time as the pipeline measured it (all attempts of a resumed stage added up; the CPU may have been "
            "shared); tokens processed = steps x global batch rows x seq_len (padding included; DPO counts chosen "
            "and rejected).", ""]
    rows = []
    for name, s in report["stages"].items():
        rows.append([name, s.get("input", ""), str(s["steps"]), f"{s['tokens']:,}", duration(s.get("wall_s")),
                     f"{s['tokens'] / s['train_s']:.0f}" if s.get("train_s") else "n/a", s.get("status", "")])
    out += [table(["stage", "from", "steps", "tokens", "wall time", "tokens/s (training steps)", "status"], rows), ""]
    eval_rows = []
    for label, by_protocol in report["evals"].items():
        for protocol, info in by_protocol.items():
            eval_rows.append([label, protocol, duration(info.get("wall_s")), info.get("status", "")])
    if eval_rows:
        out += [table(["evaluated model", "protocol", "wall time", "status"], eval_rows), ""]
    if report.get("total_wall_s") is not None:
        out += [f"Total wall time of the last pipeline invocation: {duration(report['total_wall_s'])}.", ""]

    if report.get("decontamination"):
        from hippocrates.eval.decontaminate import markdown_table as contamination_table
        out += ["## Decontamination", "",
                "Benchmark test items (the whole evaluated split, not only the held-out subset) that share a 13-gram "
                "with each stage's training data (`python -m hippocrates.eval.decontaminate`); every string of a "
                "training record counts, so this over-counts rather than misses.", ""]
        for stage, table_data in report["decontamination"].items():
            out += [f"### {stage}", "", contamination_table(table_data, list_limit=20), ""]
    if report.get("sft_data"):
        out += ["## SFT data", "", "```json", json.dumps(report["sft_data"], indent=2), "```", ""]
    out += ["## Resolved configs", ""]
    for name, s in report["stages"].items():
        if s.get("resolved_config"):
            out += [f"### {name} (`{s['out_dir']}/config.yaml`)", "", "```yaml", s["resolved_config"].rstrip(), "```",
                    ""]
    if report.get("pipeline_config"):
        out += ["### pipeline", "", "```yaml", yaml.safe_dump(report["pipeline_config"], sort_keys=False).rstrip(),
                "```", ""]
    return "\n".join(out)


def ci_text(m: dict) -> str:
    return "n/a" if m.get("ci_low") is None else f"[{100 * m['ci_low']:+.1f}, {100 * m['ci_high']:+.1f}]"


def verdict_lines(report: dict, title_of: dict) -> list[str]:
    """The recipe's headline: does SFT beat the base model and the majority class on PubMedQA?"""
    lines = []
    for col_key, title in title_of.items():
        if not col_key.startswith("pubmedqa/"):
            continue
        sft = report["scores"].get("sft", {}).get(col_key)
        base = report["scores"].get("base", {}).get(col_key)
        if sft is None or base is None:
            continue
        vs_base = compare(base, sft, report["correct"].get("base", {}).get(col_key),
                          report["correct"].get("sft", {}).get(col_key))
        maj = next(v for v in report["vs_baselines"]
                   if v["model"] == "sft" and v["column"] == col_key and v["baseline_name"] == "majority")
        ok = vs_base["moved"] == "up" and maj["beats"]
        p_text = "n/a" if vs_base["p"] is None else f"{vs_base['p']:.3g}"
        lines += [f"**{title}, SFT:** {pct(sft['acc'])} ± {pct(sft['stderr'])} vs base {pct(base['acc'])} "
                  f"({100 * vs_base['diff']:+.1f}, 95% CI {ci_text(vs_base)}, McNemar p {p_text}) and majority "
                  f"class {pct(maj['baseline'])} ({100 * maj['diff']:+.1f}, 2 se {100 * maj['two_se']:.1f}): "
                  + (f"beats both (McNemar p < {ALPHA} against base; more than two standard errors above the "
                     "majority class)." if ok else
                     f"does NOT beat both (needed: McNemar p < {ALPHA} against base and more than two standard errors "
                     "above the majority class)."), ""]
    return lines


def plot_losses(report: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [(name, read_metrics(Path(s["out_dir"]) / "metrics.jsonl")) for name, s in report["stages"].items()]
    stages = [(name, records) for name, records in stages if any("loss" in r for r in records)]
    fig, axes = plt.subplots(1, max(len(stages), 1), figsize=(4.5 * max(len(stages), 1), 3.6), squeeze=False)
    for ax, (name, records) in zip(axes[0], stages):
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        ax.plot(*zip(*train), marker=".", label="training loss")
        held = [(r["step"], r["eval/loss"]) for r in records if "eval/loss" in r]
        if held:
            ax.plot(*zip(*held), marker="o", linestyle="--", label="held-out loss")
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
    if not stages:
        axes[0][0].text(0.5, 0.5, "no training metrics", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_dpo_rewards(metrics_path: Path, path: Path) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(metrics_path) if "rewards/chosen" in r]
    if not records:
        return False
    steps = [r["step"] for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name in DPO_CURVES[:3]:
        left.plot(steps, [r[name] for r in records], marker=".", label=name)
    left.axhline(0, color="gray", linewidth=0.8)
    left.set_xlabel("optimizer step")
    left.set_ylabel("beta x log-ratio")
    left.legend()
    left.grid(alpha=0.3)
    right.plot(steps, [r["rewards/accuracies"] for r in records], marker=".", label="rewards/accuracies")
    held = [(r["step"], r["eval/rewards/accuracies"]) for r in records if "eval/rewards/accuracies" in r]
    if held:
        right.plot(*zip(*held), marker="o", linestyle="--", label="held-out rewards/accuracies")
    right.set_ylim(-0.05, 1.05)
    right.set_xlabel("optimizer step")
    right.legend()
    right.grid(alpha=0.3)
    fig.suptitle("DPO rewards")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(run_dir: Path) -> dict:
    """report.md, report.json, loss_curves.png and (after DPO) dpo_rewards.png in run_dir; returns the report."""
    run_dir = Path(run_dir)
    report = build(run_dir)
    plot_losses(report, run_dir / "loss_curves.png")
    report["files"] = {"report.md": str(run_dir / "report.md"), "loss_curves.png": str(run_dir / "loss_curves.png")}
    if "dpo" in report["stages"] and plot_dpo_rewards(Path(report["stages"]["dpo"]["out_dir"]) / "metrics.jsonl",
                                                      run_dir / "dpo_rewards.png"):
        report["files"]["dpo_rewards.png"] = str(run_dir / "dpo_rewards.png")
    (run_dir / "report.md").write_text(render_markdown(report))
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m hippocrates.train.report RUN_DIR", file=sys.stderr)
        return 2
    try:
        write_report(Path(args[0]))
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(Path(args[0]) / "report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
