"""The command line of the training stages: [--config FILE] [--print-config] [key=value ...] -> engine.train.

One process: `hippo cpt ...`, `python -m hippocrates.train.cpt ...` or `python train/cpt.py ...`; several:
`torchrun --nproc_per_node=N -m hippocrates.train.cpt ...` (or `torchrun ... train/cpt.py` from the repository root).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import yaml

from hippocrates.engine.openmp import prefer_passive_wait

prefer_passive_wait()  # before torch loads: engine/openmp.py says why

from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402

LAUNCH = """launch: hippo {stage} ... | python -m hippocrates.train.{stage} ...      (one process)
        torchrun --nproc_per_node=N -m hippocrates.train.{stage} ...        (N processes, FSDP2)"""


@record
def main(stage: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s",
                        stream=sys.stderr)

    from hippocrates.engine.config import load_config
    from hippocrates.engine.trainer import NonFiniteError, train
    try:
        args = parser(stage, prog, load_config(stage)).parse_args(argv)
        config = load_config(stage, args.config, args.overrides)
        if args.print_config:
            if rank == 0:
                print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
            return 0
        train(config)
    except (ValueError, FileNotFoundError, NonFiniteError) as err:  # bad input or a diverged run: one line
        prefix = f"[rank {rank}] " if os.environ.get("WORLD_SIZE", "1") != "1" else ""
        print(f"{prefix}error: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


def parser(stage: str, prog: str | None, defaults) -> argparse.ArgumentParser:
    """The stage's arguments; its --help lists every config key with its type and its default in `defaults`."""
    parser = argparse.ArgumentParser(prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description=f"{stage.upper()} training.", epilog=keys_help(stage, defaults))
    parser.add_argument("--config", metavar="FILE", help="a YAML file of keys, applied over the stage's defaults")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config (YAML) and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config keys (below), applied last")
    return parser


def keys_help(stage: str, defaults) -> str:
    from hippocrates.engine.config import ALIASES, describe_keys
    rows = [(key, kind, yaml.safe_dump(value, default_flow_style=True, width=1 << 30).splitlines()[0], comment)
            for key, kind, value, comment in describe_keys(defaults)]
    width = [max(len(r[i]) for r in rows) for i in (0, 1)] + [min(24, max(len(r[2]) for r in rows))]
    lines = [f"config keys (dataclasses of engine/config.py; defaults include train/configs/{stage}.yaml):"]
    for key, kind, value, comment in rows:
        line = f"  {key:<{width[0]}}  {kind:<{width[1]}}  {value:<{width[2]}}" + (f"  # {comment}" if comment else "")
        lines.append(line.rstrip())
    lines.append("short names: " + ", ".join(f"{short} = {key}" for short, key in ALIASES.items()))
    lines.append("values are YAML: lora.rank=0 optim.lr=1e-4 lora.target_modules=[q_proj,v_proj] resume=true")
    return "\n".join(lines) + "\n\n" + LAUNCH.format(stage=stage)
