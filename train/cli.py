"""The command line shared by train/cpt.py, sft.py and dpo.py: [--config FILE] [key=value ...] -> engine.train."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from torch.distributed.elastic.multiprocessing.errors import record

EPILOG = """keys: dotted names of engine/config.py's dataclasses, e.g. lora.rank=0 optim.warmup_steps=10
data.limit=500; short names: lr, save_every, resume, eval_every, data (a file, dir or hub name).
Launch: python train/{stage}.py ... (one process) or torchrun --nproc_per_node=N train/{stage}.py ..."""


@record
def main(stage: str, argv: list[str] | None = None):
    parser = argparse.ArgumentParser(prog=f"train/{stage}.py", epilog=EPILOG.format(stage=stage),
                                     description=f"{stage.upper()} training (defaults: train/configs/{stage}.yaml)")
    parser.add_argument("--config", help="a YAML file of keys, applied over the stage defaults")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s",
                        stream=sys.stderr)

    from hippocrates.engine.config import load_config
    from hippocrates.engine.trainer import NonFiniteError, train
    try:
        config = load_config(stage, args.config, args.overrides)
        train(config)
    except (ValueError, FileNotFoundError, NonFiniteError) as err:  # bad input or a diverged run: one line
        prefix = f"[rank {rank}] " if "WORLD_SIZE" in os.environ and os.environ["WORLD_SIZE"] != "1" else ""
        print(f"{prefix}error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
