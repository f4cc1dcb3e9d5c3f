"""eval.compare: McNemar's exact test and the paired bootstrap against independent references; mismatches refused."""
import random

import numpy as np
import pytest
from scipy.stats import binomtest

from hippocrates.eval.compare import main as compare_main
from hippocrates.eval.compare import mcnemar_exact, paired_bootstrap_ci
from hippocrates.eval.report import task_metrics, write_outputs


def random_pair(rng, n, p_a, p_b):
    a = [float(rng.random() < p_a) for _ in range(n)]
    b = [float(rng.random() < p_b) for _ in range(n)]
    return a, b


@pytest.mark.parametrize("seed", range(5))
def test_mcnemar_equals_two_sided_binomial_test(seed):
    rng = random.Random(seed)
    a, b = random_pair(rng, rng.randint(20, 200), rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8))
    got = mcnemar_exact(a, b)
    only_a = sum(1 for x, y in zip(a, b) if x == 1 and y == 0)
    only_b = sum(1 for x, y in zip(a, b) if x == 0 and y == 1)
    assert (got["b"], got["c"]) == (only_a, only_b)
    assert got["p"] == pytest.approx(binomtest(only_b, only_a + only_b, 0.5).pvalue, rel=1e-9)
    assert mcnemar_exact([1.0, 0.0], [1.0, 0.0])["p"] == 1.0  # no disagreement


def test_paired_bootstrap_interval_against_a_plain_loop():
    """The vectorized interval against a slow percentile bootstrap written with Python's own generator; both must
    bracket the observed difference and agree to sampling noise."""
    rng = random.Random(7)
    a, b = random_pair(rng, 150, 0.5, 0.6)
    low, high = paired_bootstrap_ci(a, b, resamples=4000)
    diffs = [y - x for x, y in zip(a, b)]
    means = sorted(sum(diffs[rng.randrange(len(diffs))] for _ in diffs) / len(diffs) for _ in range(4000))
    ref_low, ref_high = means[int(0.025 * 4000)], means[int(0.975 * 4000) - 1]
    observed = sum(diffs) / len(diffs)
    assert low < observed < high
    assert low == pytest.approx(ref_low, abs=0.015) and high == pytest.approx(ref_high, abs=0.015)
    se = np.std(diffs, ddof=1) / np.sqrt(len(diffs))  # normal approximation of the same interval
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.15)


def fake_run(correct, ids=None, task="medqa", **result_keys):
    ids = ids or [str(i) for i in range(len(correct))]
    samples = [{"task": task, "id": i, "acc": float(c), "acc_norm": float(c)} for i, c in zip(ids, correct)]
    result = {**task_metrics(samples), "protocol": "letter", "num_fewshot": 0, "dtype": "float32", **result_keys}
    return {"config": {"model": "m"}, "results": {task: result}, "samples": samples}


def test_compare_prints_mcnemar_and_bootstrap(tmp_path, capsys):
    rng = random.Random(3)
    a, b = random_pair(rng, 60, 0.4, 0.7)
    write_outputs(tmp_path / "a", fake_run(a))
    write_outputs(tmp_path / "b", fake_run(b))
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| medqa | acc |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    assert cells[2] == "60" and cells[5] == f"{100 * (sum(b) - sum(a)) / 60:+.2f}"
    assert cells[7] == f"{only_a} / {only_b}"
    assert float(cells[8]) == pytest.approx(binomtest(only_b, only_a + only_b, 0.5).pvalue, rel=1e-3)


@pytest.mark.parametrize("change, reason", [
    ({"protocol": "text"}, "protocol differs"),
    ({"num_fewshot": 5}, "num_fewshot differs"),
    ({"dtype": "bfloat16"}, "dtype differs"),
    ({"ids": [str(i) for i in range(1, 5)]}, "the item sets differ"),
])
def test_compare_refuses_mismatched_runs(tmp_path, capsys, change, reason):
    write_outputs(tmp_path / "a", fake_run([1, 0, 0, 1]))
    ids = change.pop("ids", None)
    write_outputs(tmp_path / "b", fake_run([1, 1, 0, 1], ids=ids, **change))
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: refusing to compare: task medqa: ") and reason in err
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "missing")]) == 2
