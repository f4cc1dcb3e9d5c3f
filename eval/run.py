"""python -m hippocrates.eval.run --model PATH --tasks medqa,medmcqa,pubmedqa [--scoring letter|text] [--num-fewshot K] ...

`--model`: a Hugging Face checkpoint dir, a .gguf file, or a training run's out_dir (its final/).
`--tasks`: built-in names and/or task spec files (.yaml / .json), comma-separated.
Writes results.json and samples.jsonl into --out and prints a markdown table. Bad input: one line, exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .evaluator import evaluate
from .report import markdown_table, write_outputs
from .tasks import PROTOCOLS, load_task


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m hippocrates.eval.run", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tasks", default="medqa,medmcqa,pubmedqa")
    parser.add_argument("--data-dir", default=None,
                        help="root of relative data paths (default: models.paths.data_dir())")
    parser.add_argument("--limit", type=int, default=None, help="first N items of each task")
    parser.add_argument("--num-fewshot", type=int, default=0)
    parser.add_argument("--scoring", choices=PROTOCOLS, default="letter")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="items per batch (default: 8)")
    parser.add_argument("--seed", type=int, default=1234, help="few-shot sampling seed")
    parser.add_argument("--add-bos", choices=("auto", "yes", "no"), default="auto",
                        help="auto: as the tokenizer does by default (LLaMA/Mistral yes, SmolLM2 no)")
    parser.add_argument("--max-length", type=int, default=None, help="model window (default: from its config)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--out", default=None, help="output dir (default: eval_out/<model>-<scoring>-<k>shot)")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from hippocrates.models import load_model, load_tokenizer
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        tasks = [load_task(name.strip(), data_dir=args.data_dir, limit=args.limit)
                 for name in args.tasks.split(",") if name.strip()]
        dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
        model = load_model(args.model, dtype=dtype, device=args.device)
        tokenizer = load_tokenizer(args.model)
        add_bos = {"auto": None, "yes": True, "no": False}[args.add_bos]
        run = evaluate(model, tokenizer, tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                       protocol=args.scoring, batch_size=args.batch_size, seed=args.seed, add_bos=add_bos,
                       max_length=args.max_length, progress=not args.no_progress, model_path=str(args.model))
    except (ValueError, FileNotFoundError) as err:  # EvalError, CheckpointError, TokenizerError, a missing data dir
        print(f"error: {err}", file=sys.stderr)
        return 2
    model_name = Path(str(args.model).rstrip("/")).stem or "model"
    out = Path(args.out or f"eval_out/{model_name}-{args.scoring}-{args.num_fewshot}shot")
    write_outputs(out, run)
    print(markdown_table(run["results"]))
    print(f"\nwrote {out / 'results.json'} and {out / 'samples.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
