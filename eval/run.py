"""python -m hippocrates.eval.run --model PATH --tasks medqa,medmcqa,pubmedqa [--scoring letter|text] [--num-fewshot K] ...

`--model`: a Hugging Face checkpoint dir, a .gguf file, a training run's out_dir (its final/), or a PEFT adapter dir
(its adapter_config.json names the base); `--adapter DIR` merges a PEFT LoRA adapter into `--model`.
`--tasks`: built-in names and/or task spec files (.yaml / .json), comma-separated.
`--fewshot-data TASK=SOURCE`: the train split to draw few-shot examples from (a local file laid out as the evaluated
split, or a hub name such as GBaker/MedQA-USMLE-4-options-hf), as lm-evaluation-harness does.
Writes results.json, samples.jsonl and lm_eval_results.json (lm-evaluation-harness's results schema) into --out and
prints a markdown table. Bad input: one line, exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .evaluator import evaluate
from .loading import DTYPES, load_for_eval
from .records import EvalError
from .report import LM_EVAL_RESULTS_FILE, markdown_table, write_outputs
from .tasks import PROTOCOLS, load_task, resolve_spec, with_train_split


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m hippocrates.eval.run", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter", default=None, help="a PEFT LoRA adapter dir, merged into --model")
    parser.add_argument("--tasks", default="medqa,medmcqa,pubmedqa")
    parser.add_argument("--data-dir", default=None,
                        help="root of relative data paths (default: models.paths.data_dir())")
    parser.add_argument("--limit", type=int, default=None, help="first N items of each task")
    parser.add_argument("--num-fewshot", type=int, default=0)
    parser.add_argument("--fewshot-data", action="append", default=[], metavar="TASK=SOURCE[:SPLIT]",
                        help="a task's train split for few-shot examples (repeatable); without it the task's own "
                             "pool is used and named in results.json")
    parser.add_argument("--scoring", choices=PROTOCOLS, default="letter")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="items per batch (default: 8)")
    parser.add_argument("--seed", type=int, default=1234, help="few-shot sampling seed")
    parser.add_argument("--add-bos", choices=("auto", "yes", "no"), default="auto",
                        help="auto: as the tokenizer does by default (LLaMA/Mistral yes, SmolLM2 no)")
    parser.add_argument("--max-length", type=int, default=None, help="model window (default: from its config)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="auto: the checkpoint's dtype (config.json), as lm-evaluation-harness; float32 on CPU")
    parser.add_argument("--out", default=None, help="output dir (default: eval_out/<model>-<scoring>-<k>shot)")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def parse_fewshot_data(values: list[str]) -> dict[str, tuple[str, str | None]]:
    """["medqa=/data/train.jsonl", "medmcqa=openlifescienceai/medmcqa:train"] -> {task: (source, split)}."""
    out = {}
    for value in values:
        task, sep, source = value.partition("=")
        if not sep or not task.strip() or not source.strip():
            raise EvalError(f"--fewshot-data {value!r}: expected TASK=SOURCE (a file or a hub name[:split])")
        split = None
        if not Path(source).exists() and ":" in source:
            source, split = source.rsplit(":", 1)
        out[task.strip()] = (source, split)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        train_splits = parse_fewshot_data(args.fewshot_data)
        specs = [resolve_spec(name.strip()) for name in args.tasks.split(",") if name.strip()]
        unknown = sorted(set(train_splits) - {spec.name for spec in specs})
        if unknown:
            raise EvalError(f"--fewshot-data {unknown[0]}=...: {unknown[0]} is not one of --tasks")
        specs = [with_train_split(spec, *train_splits[spec.name]) if spec.name in train_splits else spec
                 for spec in specs]
        tasks = [load_task(spec, data_dir=args.data_dir, limit=args.limit) for spec in specs]
        loaded = load_for_eval(args.model, adapter=args.adapter, dtype=args.dtype, device=args.device)
        add_bos = {"auto": None, "yes": True, "no": False}[args.add_bos]
        run = evaluate(loaded.model, loaded.tokenizer, tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                       protocol=args.scoring, batch_size=args.batch_size, seed=args.seed, add_bos=add_bos,
                       max_length=args.max_length, progress=not args.no_progress, model_path=loaded.base,
                       extra_config={"adapter": loaded.adapter, "checkpoint_dtype": loaded.checkpoint_dtype,
                                     "requested_dtype": args.dtype, "device": str(args.device)})
    except (ValueError, FileNotFoundError) as err:  # EvalError, CheckpointError, TokenizerError, a missing data dir
        print(f"error: {err}", file=sys.stderr)
        return 2
    model_name = Path(str(args.adapter or args.model).rstrip("/")).stem or "model"
    out = Path(args.out or f"eval_out/{model_name}-{args.scoring}-{args.num_fewshot}shot")
    write_outputs(out, run)
    print(markdown_table(run["results"]))
    print(f"\nwrote {out / 'results.json'}, {out / 'samples.jsonl'} and {out / LM_EVAL_RESULTS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
