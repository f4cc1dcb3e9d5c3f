"""python -m hippocrates.eval.compare RUN_A RUN_B: did B score better than A on the same items?

A run is an --out dir of eval.run (results.json + samples.jsonl). Per task and metric (acc, acc_norm):
- the difference B - A in points and its 95% paired bootstrap interval: the items are resampled with replacement
  (BOOTSTRAP_RESAMPLES times, a fixed seed) and the 2.5th / 97.5th percentiles of the mean per-item difference are
  reported;
- McNemar's exact test on per-item correctness: of the items the two runs disagree on, b are right only in A and c
  only in B; under "no difference" c ~ Binomial(b + c, 1/2), and p is the two-sided binomial tail
  min(1, 2 * P[X <= min(b, c)]).
Runs are compared only when they scored the same items the same way: a task whose protocol, number of shots, dtype
or item set differs between A and B is refused with a one-line reason (exit status 2).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from .records import EvalError
from .report import RESULTS_FILE, SAMPLES_FILE

METRICS = ("acc", "acc_norm")
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 1234
MATCHED_KEYS = ("protocol", "num_fewshot", "dtype")  # what must agree between two runs of a task


def load_run(path: str | Path) -> tuple[dict, dict[tuple[str, str], dict]]:
    """(results.json content, {(task, id): sample}) of one run."""
    path = Path(path)
    results_file = path / RESULTS_FILE if path.is_dir() else path
    if not results_file.is_file():
        raise EvalError(f"{results_file}: no such results file")
    try:
        run = json.loads(results_file.read_text())
        run["results"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise EvalError(f"{results_file}: not a results.json of eval.run") from None
    samples = {}
    samples_file = results_file.parent / SAMPLES_FILE
    if samples_file.is_file():
        with open(samples_file) as f:
            for line_no, line in enumerate(f, 1):
                try:
                    s = json.loads(line)
                    samples[(s["task"], str(s["id"]))] = s
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise EvalError(f"{samples_file}:line {line_no}: not a sample record") from None
    return run, samples


def mcnemar_exact(correct_a: list[float], correct_b: list[float]) -> dict:
    """Exact two-sided McNemar test on paired 0/1 scores: {"b": right only in A, "c": right only in B, "p"}."""
    b = sum(1 for x, y in zip(correct_a, correct_b) if x and not y)
    c = sum(1 for x, y in zip(correct_a, correct_b) if y and not x)
    n = b + c
    if n == 0:
        return {"b": 0, "c": 0, "p": 1.0}
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return {"b": b, "c": c, "p": min(1.0, 2 * tail)}


def paired_bootstrap_ci(correct_a: list[float], correct_b: list[float], resamples: int = BOOTSTRAP_RESAMPLES,
                        seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of mean(B - A) over items resampled with replacement (the same items for A and B)."""
    diff = np.asarray(correct_b, dtype=np.float64) - np.asarray(correct_a, dtype=np.float64)  # [n]
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # [chunk, n] index draws, bounded memory
        chunk = min(1000, resamples - start)
        means[start:start + chunk] = diff[rng.integers(0, len(diff), size=(chunk, len(diff)))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def paired_comparison(correct_a: list[float], correct_b: list[float]) -> dict:
    """Everything one row of the comparison shows: accuracies, difference, bootstrap CI, McNemar."""
    n = len(correct_a)
    acc_a, acc_b = sum(correct_a) / n, sum(correct_b) / n
    low, high = paired_bootstrap_ci(correct_a, correct_b)
    return {"n": n, "a": acc_a, "b": acc_b, "diff": acc_b - acc_a, "ci_low": low, "ci_high": high,
            **{f"mcnemar_{k}": v for k, v in mcnemar_exact(correct_a, correct_b).items()}}


def mismatch(task: str, a: dict, b: dict, ids_a: set, ids_b: set) -> str | None:
    """Why the two runs of a task cannot be compared item by item, or None."""
    for key in MATCHED_KEYS:
        if a.get(key) != b.get(key):
            return f"task {task}: {key} differs (A: {a.get(key)}, B: {b.get(key)})"
    if not ids_a or not ids_b:
        return f"task {task}: no per-item samples (samples.jsonl) in {'A' if not ids_a else 'B'}"
    if ids_a != ids_b:
        return (f"task {task}: the item sets differ ({len(ids_a & ids_b)} shared, {len(ids_a - ids_b)} only in A, "
                f"{len(ids_b - ids_a)} only in B)")
    return None


def compare_runs(run_a, run_b, samples_a, samples_b) -> dict[str, dict[str, dict]]:
    """{task: {metric: paired_comparison}} for the tasks both runs scored; EvalError names the first mismatch."""
    shared = [t for t in run_a["results"] if t in run_b["results"]]
    if not shared:
        raise EvalError(f"no task in common (A: {', '.join(run_a['results'])}; B: {', '.join(run_b['results'])})")
    out = {}
    for task in shared:
        ids_a = {i for t, i in samples_a if t == task}
        ids_b = {i for t, i in samples_b if t == task}
        reason = mismatch(task, run_a["results"][task], run_b["results"][task], ids_a, ids_b)
        if reason:
            raise EvalError(f"refusing to compare: {reason}")
        ids = sorted(ids_a)
        out[task] = {metric: paired_comparison([samples_a[(task, i)][metric] for i in ids],
                                               [samples_b[(task, i)][metric] for i in ids]) for metric in METRICS}
    return out


def comparison_table(comparisons: dict[str, dict[str, dict]]) -> str:
    lines = ["| task | metric | n | A (%) | B (%) | B - A (pts) | 95% CI (paired bootstrap) | right only in A / B "
             "| McNemar p |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for task, by_metric in comparisons.items():
        for metric, c in by_metric.items():
            lines.append(f"| {task} | {metric} | {c['n']} | {100 * c['a']:.2f} | {100 * c['b']:.2f} | "
                         f"{100 * c['diff']:+.2f} | [{100 * c['ci_low']:+.2f}, {100 * c['ci_high']:+.2f}] | "
                         f"{c['mcnemar_b']} / {c['mcnemar_c']} | {c['mcnemar_p']:.4g} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hippocrates.eval.compare", description=__doc__.splitlines()[0])
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    args = parser.parse_args(argv)
    try:
        run_a, samples_a = load_run(args.run_a)
        run_b, samples_b = load_run(args.run_b)
        comparisons = compare_runs(run_a, run_b, samples_a, samples_b)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"A: {args.run_a} ({run_a.get('config', {}).get('model')})")
    print(f"B: {args.run_b} ({run_b.get('config', {}).get('model')})\n")
    print(comparison_table(comparisons))
    return 0


if __name__ == "__main__":
    sys.exit(main())
