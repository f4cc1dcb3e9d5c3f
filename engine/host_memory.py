"""Where the training forward's large CPU allocations come from (glibc only; a no-op elsewhere and on GPU).

The problem, measured on the benchmark workload (SmolLM2-135M, LoRA, 4 x 512 tokens, fp32): glibc serves the
1.5-13 MB activations of a step from its heap, and the heap fragments. Peak RSS grew from 3.5 GB in step 1 to 4.5 GB
by step 5, while less than 0.3 GB of the heap was in use between steps.

Inside `mmapped_forward()`, an allocation of FORWARD_MMAP_BYTES or more that the heap's free chunks cannot serve
is its own mmap, not a heap extension (glibc consults the threshold only when the heap would have to grow). So the
activations kept for the backward mostly go back to the OS the moment the backward frees them, and the heap's size
is set by the backward's short-lived gradients, which keep reusing it (threshold HEAP_MMAP_BYTES, where glibc's own
dynamic threshold settles on 64-bit).
The price is fresh, zero-filled pages for every large forward allocation: measured on that workload, about 12% more
CPU time per step for a 1.3 GB lower peak (benchmarks/train_throughput.py prints both sides: `engine`, `engine_heap`).
"""
from __future__ import annotations

import ctypes
from contextlib import contextmanager

import torch

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
FORWARD_MMAP_BYTES = 4 << 20
HEAP_MMAP_BYTES = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit


def _glibc_mallopt():
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # only glibc's mallopt numbers its parameters this way
        return libc.mallopt
    except (OSError, AttributeError):
        return None


_MALLOPT = _glibc_mallopt()


@contextmanager
def mmapped_forward(device, enabled: bool = True):
    """Large allocations made in the block are mmapped (CPU with glibc and grad enabled; otherwise nothing)."""
    if not (enabled and _MALLOPT is not None and torch.device(device).type == "cpu" and torch.is_grad_enabled()):
        yield
        return
    _MALLOPT(M_MMAP_THRESHOLD, FORWARD_MMAP_BYTES)
    try:
        yield
    finally:
        _MALLOPT(M_MMAP_THRESHOLD, HEAP_MMAP_BYTES)
