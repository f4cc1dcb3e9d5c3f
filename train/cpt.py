"""Continual pre-training on raw text (MedQuAD answers by default).

    torchrun --nproc_per_node=2 train/cpt.py [--config FILE] [key=value ...]
    python train/cpt.py [--config FILE] [key=value ...]          # one process
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, when not installed with pip -e

from train.cli import main  # noqa: E402

if __name__ == "__main__":
    main("cpt")
