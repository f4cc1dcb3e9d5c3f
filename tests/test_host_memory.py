"""engine/host_memory.py: inside mmapped_forward a large CPU allocation is its own mmap; outside, the heap serves it."""
import ctypes

import pytest
import torch

from engine import host_memory


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def mmapped_bytes() -> int:
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2().hblkhd


needs_glibc = pytest.mark.skipif(host_memory._MALLOPT is None or not hasattr(ctypes.CDLL(None), "mallinfo2"),
                                 reason="mallopt/mallinfo2 are glibc's")


def allocation_mmapped(nbytes: int) -> bool:
    before = mmapped_bytes()
    t = torch.empty(nbytes // 4, dtype=torch.float32)
    grew = mmapped_bytes() - before >= nbytes
    del t
    return grew


@needs_glibc
def test_forward_allocations_are_mmapped_and_the_heap_threshold_comes_back():
    size = host_memory.FORWARD_MMAP_BYTES + (1 << 20)  # above the forward threshold, below the heap's
    with host_memory.mmapped_forward("cpu"):
        assert allocation_mmapped(size)
    assert not allocation_mmapped(size)
    with host_memory.mmapped_forward("cpu", enabled=False):
        assert not allocation_mmapped(size)
    with torch.no_grad(), host_memory.mmapped_forward("cpu"):  # evaluation forwards keep nothing: no mmap
        assert not allocation_mmapped(size)
