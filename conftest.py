"""Test setup for the whole repository: the Triton interpreter on machines without a GPU.

TRITON_INTERPRET must be set before the first `import triton` anywhere in the process, so it lives here, in the
root conftest, which pytest loads before any test module.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest's importlib mode names kernels/test_*.py "kernels.test_*" and, finding no module "kernels" in sys.modules, makes
# one from the folder, which would shadow Hugging Face's `kernels` (transformers imports it) for the rest of the
# session. Import the installed package first, so pytest hangs the test modules under it instead.
try:
    import kernels  # noqa: E402, F401
except ImportError:
    pass
