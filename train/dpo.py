"""Direct preference optimization on prompt/chosen/rejected pairs (LiveQA graded pairs by default).

    torchrun --nproc_per_node=2 train/dpo.py [--config FILE] [key=value ...]
    python train/dpo.py [--config FILE] [key=value ...]          # one process
"""
from hippocrates.train.cli import main

if __name__ == "__main__":
    main("dpo")
