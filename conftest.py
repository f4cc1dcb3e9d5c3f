"""Test setup for the whole repository: the Triton interpreter on machines without a GPU.

TRITON_INTERPRET must be set before the first `import triton` anywhere in the process, so it lives here, in the
root conftest, which pytest loads before any test module.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
