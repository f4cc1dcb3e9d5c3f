"""Supervised instruction tuning: loss on the response tokens only.

    hippo sft [--config FILE] [--print-config] [key=value ...]                  # one process
    torchrun --nproc_per_node=2 -m hippocrates.train.sft [--config FILE] [key=value ...]
    torchrun --nproc_per_node=2 train/sft.py ...                                # from the repository root
    hippo sft --help                                      # every config key, its type and default
"""
import sys

from hippocrates.train.cli import main

if __name__ == "__main__":
    sys.exit(main("sft"))
