"""Supervised instruction tuning: loss on the response tokens only.

    torchrun --nproc_per_node=2 train/sft.py [--config FILE] [key=value ...]
    python train/sft.py [--config FILE] [key=value ...]          # one process
"""
from hippocrates.train.cli import main

if __name__ == "__main__":
    main("sft")
