"""The lm-evaluation-harness backend against lm-eval's own Hugging Face backend (`hf`) on the same SmolLM2 weights.

lm-eval's own medqa_4options and pubmedqa configs run on a few local items (no network); both backends must give the
same per-choice log-likelihoods (within 1e-4), greedy flags and predictions. Rolling log-likelihood, an empty context,
a context longer than the window and greedy generation are checked on a short window.
"""
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from hippocrates.eval.lmeval import HippocratesLM, write_local_tasks  # noqa: E402

ITEMS_PER_TASK = 3
LL_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def hf_lm(smollm2_dir):
    return HFLM(pretrained=str(smollm2_dir), dtype="float32", device="cpu", batch_size=8)


def per_item(results, task):
    """{doc_id: ([log-likelihood per choice], [is_greedy per choice], acc)}"""
    return {s["doc_id"]: ([r[0][0] for r in s["resps"]], [r[0][1] for r in s["resps"]], s["acc"])
            for s in results["samples"][task]}


def test_lm_eval_tasks_agree_with_hf_backend(smollm2_dir, data_dir, hf_lm, tmp_path):
    tasks = write_local_tasks(tmp_path, data_dir, limit=ITEMS_PER_TASK)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    ours = lm_eval.simple_evaluate(model="hippocrates", model_args=f"pretrained={smollm2_dir},dtype=float32",
                                   tasks=tasks, task_manager=manager, log_samples=True, batch_size=4)
    theirs = lm_eval.simple_evaluate(model=hf_lm, tasks=tasks, task_manager=manager, log_samples=True)
    for task in tasks:
        our_items, their_items = per_item(ours, task), per_item(theirs, task)
        assert sorted(our_items) == list(range(ITEMS_PER_TASK)) == sorted(their_items)
        for doc_id, (lls, greedy, acc) in our_items.items():
            their_lls, their_greedy, their_acc = their_items[doc_id]
            assert len(lls) == len(their_lls) == (4 if task.startswith("medqa") else 3)
            assert max(abs(a - b) for a, b in zip(lls, their_lls)) < LL_TOLERANCE, (task, doc_id, lls, their_lls)
            assert lls.index(max(lls)) == their_lls.index(max(their_lls)), (task, doc_id)
            assert greedy == their_greedy and acc == their_acc
        assert ours["results"][task]["acc,none"] == theirs["results"][task]["acc,none"]


def test_rolling_truncation_empty_context_and_generation_agree(smollm2_dir, hf_lm):
    window = 24
    ours = HippocratesLM(pretrained=str(smollm2_dir), dtype="float32", max_length=window, batch_size=3)
    theirs = HFLM(pretrained=hf_lm.model, tokenizer=hf_lm.tokenizer, max_length=window, batch_size=4)
    abstract = ("Iron deficiency is the most common cause of anemia worldwide. In adults it usually follows chronic "
                "blood loss, most often from the gastrointestinal tract or from heavy menstrual bleeding; in "
                "children and pregnant women it also follows increased demand. Oral iron corrects it in most patients.")
    rolling = [Instance("loglikelihood_rolling", {}, (text,), 0) for text in (abstract, "Anemia.")]
    pairs = [Instance("loglikelihood", {}, args, i) for i, args in enumerate([
        ("", " Iron deficiency"),  # empty context: [prefix token] + continuation
        ("Question: " + abstract + " What is the most common cause?\nAnswer:", " iron deficiency"),  # > window
        ("The capital of France is", " Paris"),
    ])]
    our_rolling, their_rolling = ours.loglikelihood_rolling(rolling), theirs.loglikelihood_rolling(rolling)
    assert max(abs(a - b) for a, b in zip(our_rolling, their_rolling)) < LL_TOLERANCE
    assert len(ours.tok_encode(abstract)) > 2 * window  # three windows or more
    our_pairs, their_pairs = ours.loglikelihood(pairs), theirs.loglikelihood(pairs)
    for (ll, greedy), (their_ll, their_greedy) in zip(our_pairs, their_pairs):
        assert abs(ll - their_ll) < LL_TOLERANCE and greedy == their_greedy
    assert our_pairs[2][1]  # " Paris" is the model's own choice

    generation = [Instance("generate_until", {}, (context, {"until": until, "max_gen_toks": 12}), i)
                  for i, (context, until) in enumerate([("The capital of France is", ["."]),
                                                        ("List three symptoms of anemia:\n1.", ["\n3."])])]
    assert ours.generate_until(generation) == theirs.generate_until(generation)


def test_command_line_help_and_missing_lm_eval():
    help_run = subprocess.run([sys.executable, "-m", "hippocrates.lmeval", "run", "--help"],
                              capture_output=True, text=True, timeout=300)
    assert help_run.returncode == 0 and "--model_args" in help_run.stdout
    missing = subprocess.run([sys.executable, "-c", "import sys; sys.modules['lm_eval'] = None; "
                              "from hippocrates.lmeval import main; main()"],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1
    assert missing.stderr.strip() == "error: lm-evaluation-harness is not installed: pip install 'hippocrates[lmeval]'"
