"""Items per second of our evaluator and of lm-evaluation-harness on the same items, model and prompts, in one run.

    python benchmarks/eval_throughput.py --task medqa --limit 50 --protocols letter,text

lm-evaluation-harness (pip package `lm-eval`) runs its Hugging Face backend on the same HF dir, reading local copies
of the items (JSON Lines in a temp dir) through a custom task YAML whose jinja templates give the same prompts; its
task builds its own requests, and the benchmark checks that their contexts and continuations equal ours string for
string. Timed on each side: tokenizing and scoring (lm-eval: its `loglikelihood` on the item's requests; ours:
`evaluate` on the item). The two sides alternate every `--chunk` items, so that both see the same load on a shared
machine; the per-chunk ratios show how noisy that load was. Targets from issue 5: >= 3x in
`text`, >= 1.3x in `letter`, with identical predictions.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from hippocrates.eval import evaluate, load_task  # noqa: E402
from hippocrates.eval.tasks import build_request  # noqa: E402
from hippocrates.models import load_model, load_tokenizer  # noqa: E402

TARGETS = {"letter": 1.3, "text": 3.0}
LETTER_OPTIONS = "A. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\n"
TEXT_OPTIONS = "(A) {{A}} (B) {{B}} (C) {{C}} (D) {{D}}"
# (task, protocol) -> (doc_to_text jinja template, doc_to_choice): lm-eval's own task format for the same prompts
LM_EVAL_PROMPTS = {
    ("medqa", "letter"): ("Question: {{question}}\n" + LETTER_OPTIONS + "Answer:", ["A", "B", "C", "D"]),
    ("medmcqa", "letter"): ("Question: {{question}}\nChoices:\n" + LETTER_OPTIONS + "Answer:", ["A", "B", "C", "D"]),
    ("medqa", "text"): ("Question: {{question}}\n" + TEXT_OPTIONS + "\nAnswer:", "options"),
    ("medmcqa", "text"): ("Question: {{question}}\n" + TEXT_OPTIONS + "\nAnswer:", "options"),
    ("pubmedqa", "letter"): ("Abstract: {{context}}\nQuestion: {{question}}\nAnswer:", ["yes", "no", "maybe"]),
    ("pubmedqa", "text"): ("Abstract: {{context}}\nQuestion: {{question}}\nAnswer:", ["yes", "no", "maybe"]),
}


def write_lm_eval_task(folder: Path, task, protocol: str) -> str:
    """The items as JSON Lines plus a task YAML in lm-eval's format; returns the task name."""
    name = f"hippo_{task.spec.name}_{protocol}"
    data = folder / f"{name}.jsonl"
    with open(data, "w") as f:
        for item in task.items:
            doc = {"question": item.question, "options": item.choices, "gold": item.gold, **item.fields}
            doc.update({letter: text for letter, text in zip("ABCD", item.choices)})
            f.write(json.dumps(doc) + "\n")
    template, choices = LM_EVAL_PROMPTS[(task.spec.name, protocol)]
    config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
              "test_split": "test", "output_type": "multiple_choice", "doc_to_text": template,
              "doc_to_choice": choices, "doc_to_target": "gold",
              "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
    (folder / f"{name}.yaml").write_text(json.dumps(config))  # JSON is YAML
    return name


def lm_eval_instances(folder: Path, task_name: str) -> list:
    """lm-eval's own requests for the task: its template rendering, choices and target delimiter."""
    from lm_eval.tasks import TaskManager, get_task_dict
    task = get_task_dict([task_name], TaskManager(include_path=str(folder), verbosity="WARNING"))[task_name]
    task.set_config("num_fewshot", 0)
    task.build_all_requests(rank=0, world_size=1)
    return task.instances


class Clock:
    """Wall seconds and this process's CPU seconds (all its threads) of a block: on a shared machine the CPU time is
    what a side consumed, the wall time also holds the waits for a core."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def score_with_lm_eval(lm, instances: list) -> tuple[Clock, dict[int, list[tuple[str, str, float]]]]:
    """(time in lm-eval's loglikelihood, {doc_id: [(context, continuation, ll) per choice]})."""
    with Clock() as clock:
        out = lm.loglikelihood(instances, disable_tqdm=True)
    docs: dict[int, dict[int, tuple]] = {}
    for inst, (ll, _) in zip(instances, out):
        docs.setdefault(inst.doc_id, {})[inst.idx] = (*inst.args, ll)
    return clock, {doc: [choices[i] for i in sorted(choices)] for doc, choices in docs.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF dir (default: the SmolLM2-135M-Instruct fetch)")
    parser.add_argument("--task", default="medqa", choices=("medqa", "medmcqa", "pubmedqa"))
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--protocols", default="letter,text")
    parser.add_argument("--batch-size", type=int, default=None, help="ours: items per batch (default: 8)")
    parser.add_argument("--lm-eval-batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--chunk", type=int, default=8,
                        help="items per alternation between the two sides (one batch of ours)")
    parser.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model is None:
        from hippocrates.models.fetch import fetch_smollm2
        args.model = str(fetch_smollm2())

    from lm_eval.models.huggingface import HFLM
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    lm = HFLM(pretrained=args.model, dtype="float32", device="cpu", batch_size=args.lm_eval_batch_size)
    task = load_task(args.task, limit=args.limit)
    task = dataclasses.replace(task, items=task.items[:args.limit])
    rows = []
    for protocol in args.protocols.split(","):
        ours, theirs = {"wall": 0.0, "cpu": 0.0}, {"wall": 0.0, "cpu": 0.0}
        samples, docs, chunk_ratios = [], {}, []
        with tempfile.TemporaryDirectory() as tmp:
            instances = lm_eval_instances(Path(tmp), write_lm_eval_task(Path(tmp), task, protocol))
        for first in range(0, len(task.items), args.chunk):  # alternate the two sides: both see the same CPU load
            chunk = dataclasses.replace(task, items=task.items[first:first + args.chunk])
            with Clock() as ours_chunk:
                run = evaluate(model, tokenizer, [chunk], protocol=protocol, batch_size=args.batch_size,
                               progress=False)
            theirs_chunk, chunk_docs = score_with_lm_eval(
                lm, [inst for inst in instances if first <= inst.doc_id < first + args.chunk])
            for total, clock in ((ours, ours_chunk), (theirs, theirs_chunk)):
                total["wall"] += clock.wall
                total["cpu"] += clock.cpu
            samples += run["samples"]
            docs.update(chunk_docs)
            chunk_ratios.append(theirs_chunk.wall / ours_chunk.wall)
        print(f"{protocol}: ours {ours['wall']:.1f} s wall / {ours['cpu']:.1f} s CPU, "
              f"lm-eval {theirs['wall']:.1f} s wall / {theirs['cpu']:.1f} s CPU", flush=True)
        same_prompts, agree, max_diff = True, 0, 0.0
        for item, sample, choices in zip(task.items, samples, [docs[i] for i in range(len(task.items))]):
            request = build_request(task, item, protocol)
            same_prompts &= [(c, k) for c, k, _ in choices] == [(request.context, k) for k in request.continuations]
            their_lls = [ll for _, _, ll in choices]
            agree += max(range(len(their_lls)), key=their_lls.__getitem__) == sample["prediction"]
            max_diff = max(max_diff, max(abs(a - b) for a, b in zip(their_lls, sample["loglikelihoods"])))
        n = len(task.items)
        rows.append({"protocol": protocol, "items": n, "ours_items_per_s": n / ours["wall"],
                     "lm_eval_items_per_s": n / theirs["wall"], "ratio": theirs["wall"] / ours["wall"],
                     "cpu_ratio": theirs["cpu"] / ours["cpu"], "target": TARGETS[protocol],
                     "chunk_ratio_min": min(chunk_ratios), "chunk_ratio_max": max(chunk_ratios),
                     "same_prompts": same_prompts, "predictions_agree": f"{agree}/{n}",
                     "max_abs_ll_diff": max_diff, "ours_s": ours, "lm_eval_s": theirs})

    print(f"\n{args.task}, {args.limit} items, SmolLM2 fp32 on CPU, {args.threads} threads, "
          f"ours batch {args.batch_size or 'auto'}, lm-eval batch {args.lm_eval_batch_size}")
    print("| protocol | ours items/s | lm-eval items/s | ratio (wall) | per-chunk ratios | ratio (CPU time) | target | "
          "same prompts | predictions agree | max abs ll diff |")
    print("|---|---:|---:|---:|---|---:|---:|---|---|---:|")
    for r in rows:
        print(f"| {r['protocol']} | {r['ours_items_per_s']:.3f} | {r['lm_eval_items_per_s']:.3f} | {r['ratio']:.2f}x | "
              f"{r['chunk_ratio_min']:.2f}-{r['chunk_ratio_max']:.2f} | {r['cpu_ratio']:.2f}x | >= {r['target']}x | "
              f"{r['same_prompts']} | {r['predictions_agree']} | {r['max_abs_ll_diff']:.2e} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
