"""engine/host_memory.py: inside mmapped_forward a large CPU allocation is its own mmap; outside, the heap serves it.

Run in a fresh interpreter: glibc serves a request from a free heap chunk whenever one fits and consults the mmap
threshold only when the heap would have to grow, so the answer depends on the process's allocation history."""
import ctypes
import subprocess
import sys

import torch

from hippocrates.engine import host_memory

CHECK = r'''
import ctypes, torch
from hippocrates.engine import host_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
size = host_memory.FORWARD_MMAP_BYTES + (1 << 20)  # above the forward threshold, below the heap's

def mmapped(nbytes):
    before = libc.mallinfo2().hblkhd
    t = torch.empty(nbytes // 4, dtype=torch.float32)
    grew = libc.mallinfo2().hblkhd - before >= nbytes
    del t
    return grew

with host_memory.mmapped_forward("cpu"):
    inside = mmapped(size)
with torch.no_grad(), host_memory.mmapped_forward("cpu"):
    no_grad = mmapped(size)
with host_memory.mmapped_forward("cpu", enabled=False):
    disabled = mmapped(size)
after = mmapped(size)
print(inside, no_grad, disabled, after)
'''


def test_forward_allocations_are_mmapped_and_the_heap_threshold_comes_back():
    if host_memory._MALLOPT is None or not hasattr(ctypes.CDLL(None), "mallinfo2"):  # not glibc: a plain no-op
        with host_memory.mmapped_forward("cpu"):
            assert torch.empty(1 << 20).numel() == 1 << 20
        return
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    inside, no_grad, disabled, after = done.stdout.split()
    assert inside == "True"  # the forward's large allocation is its own mmap
    assert no_grad == "False"  # evaluation forwards keep nothing: no policy
    assert after == "False"  # the heap threshold is back after the forward (the heap serves it)
    assert disabled == "False"


TRIM = r'''
import ctypes, resource, sys
from hippocrates.engine import host_memory
host_memory._MALLOPT(host_memory.M_MMAP_THRESHOLD, host_memory.HEAP_MMAP_BYTES)  # both runs: from the heap
if sys.argv[1] == "keep":
    host_memory.keep_freed_memory("cpu")
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def faults_of_a_fresh_block(nbytes=20 << 20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(nbytes)
    ctypes.memset(block, 1, nbytes)
    libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

print(*[faults_of_a_fresh_block() for _ in range(4)])
'''


def test_keep_freed_memory_stops_the_heap_giving_pages_back():
    """By default a freed block at the top of the heap goes back to the OS and the next one faults its pages in
    again; after keep_freed_memory the heap reuses them."""
    if host_memory._MALLOPT is None:
        host_memory.keep_freed_memory("cpu")  # not glibc: a plain no-op
        return
    pages = (20 << 20) // 4096
    faults = {}
    for policy in ("default", "keep"):
        done = subprocess.run([sys.executable, "-c", TRIM, policy], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        faults[policy] = [int(count) for count in done.stdout.split()]
    assert min(faults["default"][1:]) > pages // 2, faults  # every block faults in afresh
    assert max(faults["keep"][1:]) < pages // 20, faults  # the heap's pages are reused
