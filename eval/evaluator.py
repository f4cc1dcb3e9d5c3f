"""`evaluate`: score an in-memory model on tasks; what `python -m hippocrates.eval.run` and the trainer call."""
from __future__ import annotations

import time

import torch

from .records import EvalError
from .report import sample_record, task_metrics
from .scoring import default_add_bos, encode_request, score_requests
from .tasks import PROTOCOLS, Task, TaskSpec, build_request, load_task


def evaluate(model, tokenizer, tasks, limit: int | None = None, num_fewshot: int = 0, protocol: str = "letter",
             batch_size: int | None = None, seed: int = 1234, data_dir=None, add_bos: bool | None = None,
             max_length: int | None = None, progress: bool = True, model_path: str | None = None) -> dict:
    """{"results": {task: metrics}, "samples": [per-item dicts], "config": {...}}.

    tasks: a list of built-in names (medqa, medmcqa, pubmedqa), spec files, TaskSpecs or loaded Tasks, or one of them,
    or a comma-separated string of names. Load a Task once and pass it again to evaluate a held-out slice every N
    training steps. The model is put in eval mode for the call and its training flag restored afterwards.
    batch_size: items per batch (default: 8).
    max_length: the window, by default the model's max_position_embeddings.
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
    add_bos = default_add_bos(tokenizer) if add_bos is None else add_bos
    max_length = max_length or model.config.max_position_embeddings
    was_training = model.training
    model.eval()
    results, samples = {}, []
    try:
        for task in loaded:
            items = task.items[:limit] if limit is not None else task.items
            start = time.perf_counter()
            requests = [build_request(task, item, protocol, num_fewshot, seed) for item in items]
            encoded = [encode_request(tokenizer, r.context, r.continuations, add_bos, max_length) for r in requests]
            lls = score_requests(model, encoded, batch_size=batch_size, progress=progress, desc=task.spec.name)
            elapsed = time.perf_counter() - start
            task_samples = [sample_record(r.task, r.item_id, ll, [len(c) for c in e.continuations], r.labels, r.gold)
                            for r, e, ll in zip(requests, encoded, lls)]
            samples += task_samples
            results[task.spec.name] = {
                **task_metrics(task_samples),
                "truncated": sum(e.truncated for e in encoded),
                "protocol": protocol, "num_fewshot": num_fewshot, "seed": seed, "model": model_path,
                "seconds": round(elapsed, 3), "items_per_s": round(len(items) / elapsed, 4) if elapsed else None,
            }
    finally:
        model.train(was_training)
    config = {"model": model_path, "tasks": [t.spec.name for t in loaded], "protocol": protocol,
              "num_fewshot": num_fewshot, "limit": limit, "seed": seed, "batch_size": batch_size,
              "add_bos": add_bos, "max_length": max_length, "torch": torch.__version__}
    return {"config": config, "results": results, "samples": samples}
