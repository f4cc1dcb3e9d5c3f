"""python -m hippocrates.eval.compare RUN_A RUN_B: the two runs' metrics side by side, with B - A and its standard error.

A run is an --out dir of eval.run (or its results.json). When both dirs hold samples.jsonl with the same item ids,
the standard error of the difference is the paired one (std of per-item B - A over sqrt(n)); otherwise it is
sqrt(se_A^2 + se_B^2).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .report import RESULTS_FILE, SAMPLES_FILE, mean_and_stderr
from .records import EvalError

METRICS = ("acc", "acc_norm")


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


def difference_stderr(task, metric, a, b, samples_a, samples_b) -> tuple[float | None, str]:
    ids = [key for key in samples_a if key[0] == task and key in samples_b]
    if len(ids) >= 2 and len(ids) == a["n"] == b["n"]:
        return mean_and_stderr([samples_b[k][metric] - samples_a[k][metric] for k in ids])[1], "paired"
    se_a, se_b = a.get(f"{metric}_stderr"), b.get(f"{metric}_stderr")
    if se_a is None or se_b is None:
        return None, "-"
    return math.sqrt(se_a ** 2 + se_b ** 2), "unpaired"


def comparison_table(run_a, run_b, samples_a=None, samples_b=None) -> str:
    samples_a, samples_b = samples_a or {}, samples_b or {}
    lines = ["| task | metric | A (%) | B (%) | B - A (pts) | se of diff | z | n (A / B) |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    tasks = list(run_a["results"]) + [t for t in run_b["results"] if t not in run_a["results"]]
    for task in tasks:
        a, b = run_a["results"].get(task), run_b["results"].get(task)
        for metric in METRICS:
            if a is None or b is None:
                only = a or b
                side = "A" if a else "B"
                lines.append(f"| {task} | {metric} | {_pct(a, metric)} | {_pct(b, metric)} | only in {side} | - | - | "
                             f"{only['n']} |")
                continue
            diff = b[metric] - a[metric]
            se, kind = difference_stderr(task, metric, a, b, samples_a, samples_b)
            z = f"{diff / se:+.2f}" if se else "-"
            se_text = f"{100 * se:.2f} ({kind})" if se is not None else "-"
            lines.append(f"| {task} | {metric} | {_pct(a, metric)} | {_pct(b, metric)} | {100 * diff:+.2f} | "
                         f"{se_text} | {z} | {a['n']} / {b['n']} |")
    return "\n".join(lines)


def _pct(r, metric) -> str:
    if r is None:
        return "-"
    se = r.get(f"{metric}_stderr")
    return f"{100 * r[metric]:.2f}" + (f" ± {100 * se:.2f}" if se is not None else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hippocrates.eval.compare", description=__doc__.splitlines()[0])
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    args = parser.parse_args(argv)
    try:
        run_a, samples_a = load_run(args.run_a)
        run_b, samples_b = load_run(args.run_b)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"A: {args.run_a} ({run_a.get('config', {}).get('model')})")
    print(f"B: {args.run_b} ({run_b.get('config', {}).get('model')})\n")
    print(comparison_table(run_a, run_b, samples_a, samples_b))
    return 0


if __name__ == "__main__":
    sys.exit(main())
