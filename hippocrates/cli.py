"""`hippo`: one installed command for every entry point; `hippo COMMAND --help` shows the command's own arguments.

Each subcommand runs the main of the module named below, with the arguments after it, exactly as
`python -m MODULE ...` does. For several training processes use torchrun on the module:
`torchrun --nproc_per_node=N -m hippocrates.train.cpt ...`.
"""
from __future__ import annotations

import importlib
import sys

TRAIN_STAGES = ("cpt", "sft", "dpo")
COMMANDS = {  # name: (module whose main runs, what it does)
    "cpt": ("hippocrates.train.cli", "continual pre-training on raw text"),
    "sft": ("hippocrates.train.cli", "supervised instruction tuning"),
    "dpo": ("hippocrates.train.cli", "direct preference optimization"),
    "pipeline": ("hippocrates.train.pipeline", "CPT -> SFT -> DPO -> evaluation -> report, resumable"),
    "eval": ("hippocrates.eval.run", "score a model on medqa, medmcqa, pubmedqa, ..."),
    "compare": ("hippocrates.eval.compare", "two evaluation runs side by side: B - A and its standard error"),
    "fetch": ("hippocrates.models.fetch", "fetch and convert a model once (smollm2), print its dir"),
    "generate": ("hippocrates.models.generate", "generate text from a checkpoint"),
    "dryrun": ("hippocrates.engine.dryrun", "a recipe on the meta device: FSDP2 plan and memory per GPU"),
    "lmeval": ("hippocrates.lmeval", "lm-evaluation-harness with the hippocrates model (needs the lmeval extra)"),
}


def usage() -> str:
    lines = ["usage: hippo COMMAND [ARGS ...]   (hippo COMMAND --help: the command's arguments)", "", "commands:"]
    lines += [f"  {name:<9} {about}" for name, (_, about) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"hippo: unknown command {name!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    sys.argv = [f"hippo {name}", *rest]  # the modules parse sys.argv[1:] (lm-eval's own CLI too)
    if name in TRAIN_STAGES:
        return module.main(name, rest, prog=f"hippo {name}") or 0
    return module.main() or 0


if __name__ == "__main__":
    sys.exit(main())
