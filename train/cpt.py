"""Continual pre-training on raw text (MedQuAD answers by default).

    hippo cpt [--config FILE] [--print-config] [key=value ...]                  # one process
    torchrun --nproc_per_node=2 -m hippocrates.train.cpt [--config FILE] [key=value ...]
    torchrun --nproc_per_node=2 train/cpt.py ...                                # from the repository root
    hippo cpt --help                                      # every config key, its type and default
"""
import sys

from hippocrates.train.cli import main

if __name__ == "__main__":
    sys.exit(main("cpt"))
