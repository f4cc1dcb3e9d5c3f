"""Continual pre-training on raw text (MedQuAD answers by default).

    torchrun --nproc_per_node=2 train/cpt.py [--config FILE] [key=value ...]
    python train/cpt.py [--config FILE] [key=value ...]          # one process
"""
from hippocrates.train.cli import main

if __name__ == "__main__":
    main("cpt")
