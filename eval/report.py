"""Metrics (acc, acc_norm and their standard errors) and the files and table a run leaves behind."""
from __future__ import annotations

import json
import math
from pathlib import Path

RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"


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


def write_outputs(out_dir: str | Path, run: dict) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {key: value for key, value in run.items() if key != "samples"}
    (out_dir / RESULTS_FILE).write_text(json.dumps(summary, indent=2))
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
    lines = ["| task | protocol | shots | n | acc (%) | acc_norm (%) | truncated |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for task, r in results.items():
        lines.append(f"| {task} | {r['protocol']} | {r['num_fewshot']} | {r['n']} | "
                     f"{_pct(r['acc'], r['acc_stderr'])} | {_pct(r['acc_norm'], r['acc_norm_stderr'])} | "
                     f"{r['truncated']} |")
    return "\n".join(lines)
