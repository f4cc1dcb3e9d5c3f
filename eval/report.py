"""Metrics (acc, acc_norm and their standard errors) and the files and table a run leaves behind."""
from __future__ import annotations

import json
import math
from pathlib import Path

RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"
LM_EVAL_RESULTS_FILE = "lm_eval_results.json"  # the same numbers in lm-evaluation-harness 0.4's results schema


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def mean_and_stderr(values: list[float]) -> tuple[float, float | None]:
    """The mean and lm-evaluation-harness's standard error: sample standard deviation (n - 1) / sqrt(n)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def sample_record(task: str, item_id: str, lls: list[float], num_tokens: list[int], labels: list[str],
                  gold: int) -> dict:
    """One samples.jsonl line. acc_norm divides each log-likelihood by its choice's length in characters."""
    normalized = [ll / len(label) for ll, label in zip(lls, labels)]
    prediction, prediction_norm = argmax(lls), argmax(normalized)
    return {"task": task, "id": item_id, "loglikelihoods": lls, "num_tokens": num_tokens, "choices": labels,
            "prediction": prediction, "prediction_norm": prediction_norm, "gold": gold,
            "acc": float(prediction == gold), "acc_norm": float(prediction_norm == gold)}


def task_metrics(samples: list[dict]) -> dict:
    out = {"n": len(samples)}
    for metric in ("acc", "acc_norm"):
        mean, stderr = mean_and_stderr([s[metric] for s in samples])
        out[metric], out[f"{metric}_stderr"] = mean, stderr
    return out


def lm_eval_results(run: dict) -> dict:
    """The run in lm-evaluation-harness 0.4's results.json schema, which leaderboard tooling reads:
    results[task]["acc,none"], "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none", plus configs, n-shot,
    higher_is_better, n-samples and config."""
    config = run.get("config", {})
    results, configs, n_shot, n_samples, higher = {}, {}, {}, {}, {}
    for task, r in run["results"].items():
        results[task] = {"alias": task, "acc,none": r["acc"], "acc_stderr,none": _na(r["acc_stderr"]),
                         "acc_norm,none": r["acc_norm"], "acc_norm_stderr,none": _na(r["acc_norm_stderr"])}
        configs[task] = {"task": task, "output_type": "multiple_choice", "num_fewshot": r["num_fewshot"],
                         "target_delimiter": " ", "fewshot_delimiter": "\n\n",
                         "fewshot_config": {"sampler": "default", "pool": r.get("fewshot_pool")},
                         "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                         for m in ("acc", "acc_norm")],
                         "metadata": {"protocol": r.get("protocol"), "token_boundary": r.get("boundary"),
                                      "add_bos": r.get("add_bos"), "dtype": r.get("dtype"), "seed": r.get("seed"),
                                      "evaluator": "hippocrates.eval"}}
        n_shot[task] = r["num_fewshot"]
        n_samples[task] = {"original": r["n"], "effective": r["n"]}
        higher[task] = {"acc": True, "acc_norm": True}
    return {"results": results, "group_subtasks": {task: [] for task in results}, "configs": configs,
            "versions": {task: "hippocrates" for task in results}, "n-shot": n_shot, "higher_is_better": higher,
            "n-samples": n_samples,
            "config": {"model": "hippocrates", "model_args": _model_args(config),
                       "batch_size": config.get("batch_size"), "limit": config.get("limit"),
                       "fewshot_seed": config.get("seed")},
            "model_name": config.get("adapter") or config.get("model")}


def _na(value):
    return "N/A" if value is None else value  # what lm-eval writes for an undefined standard error


def _model_args(config: dict) -> str:
    parts = [f"pretrained={config.get('model')}"]
    if config.get("adapter"):
        parts.append(f"adapter={config['adapter']}")
    if config.get("dtype"):
        parts.append(f"dtype={config['dtype']}")
    return ",".join(parts)


def write_outputs(out_dir: str | Path, run: dict) -> Path:
    """results.json, samples.jsonl and lm_eval_results.json in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {key: value for key, value in run.items() if key != "samples"}
    (out_dir / RESULTS_FILE).write_text(json.dumps(summary, indent=2))
    (out_dir / LM_EVAL_RESULTS_FILE).write_text(json.dumps(lm_eval_results(run), indent=2))
    with open(out_dir / SAMPLES_FILE, "w") as f:
        for sample in run["samples"]:
            f.write(json.dumps(sample) + "\n")
    return out_dir


def _pct(value, stderr=None) -> str:
    if value is None:
        return "-"
    text = f"{100 * value:.2f}"
    return text if stderr is None else f"{text} ± {100 * stderr:.2f}"


def markdown_table(results: dict) -> str:
    """The table, then one line per few-shot task naming the pool its examples came from."""
    lines = ["| task | protocol | shots | n | acc (%) | acc_norm (%) | truncated | dtype |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for task, r in results.items():
        lines.append(f"| {task} | {r['protocol']} | {r['num_fewshot']} | {r['n']} | "
                     f"{_pct(r['acc'], r['acc_stderr'])} | {_pct(r['acc_norm'], r['acc_norm_stderr'])} | "
                     f"{r['truncated']} | {r.get('dtype', '-')} |")
    pools = [f"- {task}: few-shot examples from {r['fewshot_pool']}" for task, r in results.items()
             if r.get("fewshot_pool")]
    return "\n".join(lines + ([""] + pools if pools else []))
