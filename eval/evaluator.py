"""`evaluate`: score an in-memory model on tasks; what `python -m hippocrates.eval.run` and the trainer call."""
from __future__ import annotations

import time

import torch

from .records import EvalError
from .report import sample_record, task_metrics
from .scoring import default_add_bos, encode_request, score_requests
from .tasks import PROTOCOLS, Task, TaskSpec, build_requests, load_task

# The token boundary of each protocol: `letter` is lm-evaluation-harness 0.4's (context and continuation encoded
# together, BOS as the tokenizer's default); `text` is its v0.3's, the Hippocrates paper's fork (each encoded on
# its own, no BOS). See scoring.encode_request.
PROTOCOL_BOUNDARY = {"letter": "joint", "text": "separate"}


def evaluate(model, tokenizer, tasks, limit: int | None = None, num_fewshot: int = 0, protocol: str = "letter",
             batch_size: int | None = None, seed: int = 1234, data_dir=None, add_bos: bool | None = None,
             max_length: int | None = None, progress: bool = True, model_path: str | None = None,
             extra_config: dict | None = None) -> dict:
    """{"results": {task: metrics}, "samples": [per-item dicts], "config": {...}}.

    tasks: a list of built-in names (medqa, medmcqa, pubmedqa), spec files, TaskSpecs or loaded Tasks, or one of them,
    or a comma-separated string of names. Load a Task once and pass it again to evaluate a held-out slice every N
    training steps. The model is put in eval mode for the call and its training flag restored afterwards.
    batch_size: items per batch (default: 8).
    max_length: the window, by default the model's max_position_embeddings.
    add_bos: None follows the protocol's rule (PROTOCOL_BOUNDARY); True / False override it.
    extra_config: more entries for the run's "config" (eval.run's adapter, checkpoint dtype, ...).
    Few-shot examples: one random.Random(seed) per task, drawn in item order (tasks.fewshot_draws).
    """
    if protocol not in PROTOCOLS:
        raise EvalError(f"unknown scoring protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    if num_fewshot < 0:
        raise EvalError(f"num_fewshot must be >= 0, got {num_fewshot}")
    if isinstance(tasks, str):
        tasks = [name.strip() for name in tasks.split(",") if name.strip()]
    elif isinstance(tasks, (TaskSpec, Task)):
        tasks = [tasks]
    loaded = [t if isinstance(t, Task) else load_task(t, data_dir=data_dir, limit=limit) for t in tasks]
    boundary = PROTOCOL_BOUNDARY[protocol]
    add_bos = default_add_bos(tokenizer, boundary) if add_bos is None else add_bos
    dtype = str(model.output_weight.dtype).removeprefix("torch.")
    max_length = max_length or model.config.max_position_embeddings
    was_training = model.training
    model.eval()
    results, samples = {}, []
    try:
        for task in loaded:
            items = task.items[:limit] if limit is not None else task.items
            start = time.perf_counter()
            requests = build_requests(task, items, protocol, num_fewshot, seed)
            encoded = [encode_request(tokenizer, r.context, r.continuations, add_bos, max_length, boundary)
                       for r in requests]
            lls = score_requests(model, encoded, batch_size=batch_size, progress=progress, desc=task.spec.name)
            elapsed = time.perf_counter() - start
            task_samples = [sample_record(r.task, r.item_id, ll, [len(c) for c in e.continuations], r.labels, r.gold)
                            for r, e, ll in zip(requests, encoded, lls)]
            samples += task_samples
            results[task.spec.name] = {
                **task_metrics(task_samples),
                "truncated": sum(e.truncated for e in encoded),
                "protocol": protocol, "num_fewshot": num_fewshot, "seed": seed, "model": model_path,
                "dtype": dtype, "boundary": boundary, "add_bos": add_bos,
                "fewshot_pool": task.fewshot_pool_name if num_fewshot else None,
                "seconds": round(elapsed, 3), "items_per_s": round(len(items) / elapsed, 4) if elapsed else None,
            }
    finally:
        model.train(was_training)
    config = {"model": model_path, "tasks": [t.spec.name for t in loaded], "protocol": protocol,
              "num_fewshot": num_fewshot, "limit": limit, "seed": seed, "batch_size": batch_size,
              "add_bos": add_bos, "boundary": boundary, "dtype": dtype, "max_length": max_length,
              "torch": torch.__version__, **(extra_config or {})}
    return {"config": config, "results": results, "samples": samples}
