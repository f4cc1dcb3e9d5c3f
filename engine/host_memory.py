"""Where the training forward's large CPU allocations come from (glibc only; a no-op elsewhere and on GPU).

By default the heap serves them, as every other allocation: after the first steps a step reuses the heap's pages,
with no page faults. The heap fragments (activations kept for the backward sit between short-lived buffers), so its
peak is above what is live: measured on the benchmark workload (SmolLM2-135M, LoRA, 4 x 512 tokens, fp32), peak
RSS 2.5 GB in step 1 and 3.1-3.2 GB from step 3 on (it was 3.2 -> 4.0 GB before the forward stopped allocating its
short-lived norm and SwiGLU outputs, kernels/rebuild.py's scratch, and the cross-entropy's buffer, now kept).

`mmap_activations=true` (`mmapped_forward()`) trades speed for a lower peak: an allocation of FORWARD_MMAP_BYTES or
more that the heap's free chunks cannot serve is its own mmap, not a heap extension (glibc consults the threshold
only when the heap would have to grow). So the activations kept for the backward go back to the OS the moment the
backward frees them, and the heap's size is set by the backward's short-lived gradients, which keep reusing it
(threshold HEAP_MMAP_BYTES, where glibc's own dynamic threshold settles on 64-bit). The price is fresh, zero-filled
pages for every large forward allocation: measured on that workload, peak 2.65 GB instead of 3.1-3.2 GB, and 1.5-3 s
of system time per step instead of 0.2 s (11.2-14.0 s per step against 10.4-12.5 s on the heap, alternating runs).
"""
from __future__ import annotations

import ctypes
from contextlib import contextmanager

import torch

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers
M_MMAP_THRESHOLD = -3
FORWARD_MMAP_BYTES = 4 << 20
HEAP_MMAP_BYTES = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
NEVER_TRIM = 2 ** 31 - 1


def _glibc_mallopt():
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # only glibc's mallopt numbers its parameters this way
        return libc.mallopt
    except (OSError, AttributeError):
        return None


_MALLOPT = _glibc_mallopt()


def keep_freed_memory(device) -> None:
    """From now on the heap keeps what is freed (CPU with glibc; otherwise nothing).

    glibc gives the top of a heap back to the OS once more than its trim threshold is free there, and the next
    step's allocations fault the same pages in again, zero-filled. Measured on the benchmark workload with the
    default policy: 130,000-200,000 page faults and 0.4-0.6 s of system time per step (the attention workers' heaps
    shrink and grow each layer); with this one, under 6,000 and 0.02-0.1 s. The mmap threshold is fixed at
    HEAP_MMAP_BYTES (glibc would otherwise move it). The price is in the peak: the benchmark's stayed at 3.00 GB,
    the 2-rank main job's was 2.72 GB per rank against 2.27 without it, one run each (probably the heap fragmenting
    under blocks that a moving threshold would have mmapped), though a later run of the same code peaked at 2.02."""
    if _MALLOPT is None or torch.device(device).type != "cpu":
        return
    _MALLOPT(M_TRIM_THRESHOLD, NEVER_TRIM)
    _MALLOPT(M_MMAP_THRESHOLD, HEAP_MMAP_BYTES)


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
