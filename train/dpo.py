"""Direct preference optimization on prompt/chosen/rejected pairs (LiveQA graded pairs by default).

    hippo dpo [--config FILE] [--print-config] [key=value ...]                  # one process
    torchrun --nproc_per_node=2 -m hippocrates.train.dpo [--config FILE] [key=value ...]
    torchrun --nproc_per_node=2 train/dpo.py ...                                # from the repository root
    hippo dpo --help                                      # every config key, its type and default
"""
import sys

from hippocrates.train.cli import main

if __name__ == "__main__":
    sys.exit(main("dpo"))
