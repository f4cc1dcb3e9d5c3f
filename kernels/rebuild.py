"""Activations the backward rebuilds instead of keeping: cheap elementwise outputs that the next matmul saves.

A LoRA linear saves its input for the adapter gradient dA = dxa^T x. When that input is the output of an RMSNorm
or of SwiGLU, whose own inputs are saved anyway, keeping it costs a full activation while rebuilding it costs one
elementwise pass. Inside `rebuild_scope()`, `rebuild_in_backward(out, fn, *inputs)` makes autograd store any saved
view of `out` as the recipe `fn(*inputs)` (a saved-tensor hook); the first backward that needs it reruns the recipe
once, and the result is shared by every node that saved it and freed with the last of them.

The recipe must return the same values and layout as `out` (the kernels here are deterministic). The scope is off
under activation checkpointing, which recomputes the whole block anyway.

Since nothing keeps a marked output past its block, on CPU it can live in a scratch buffer that every block reuses
(`scratch_output`): the forward writes these outputs into memory it already owns. That leaves fewer short-lived
holes between the kept activations, so glibc's heap fragments less (engine/host_memory.py), and with
`mmap_activations` three fresh mmaps per block fewer.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch

_scopes: list[dict] = []  # the open scopes, innermost last: storage pointer -> (recipe, the marked tensor)
_scratch: dict[tuple, torch.UntypedStorage] = {}  # (key, dtype) -> the storage scratch_output hands out


class _Recipe:
    __slots__ = ("fn", "inputs", "value")

    def __init__(self, fn, inputs):
        self.fn, self.inputs, self.value = fn, inputs, None

    def rebuild(self) -> torch.Tensor:
        if self.value is None:
            with torch.no_grad():
                self.value = self.fn(*self.inputs)
        return self.value


def rebuild_in_backward(out: torch.Tensor, fn, *inputs) -> torch.Tensor:
    """Mark `out` (= fn(*inputs)) to be rebuilt rather than saved; returns `out`. A no-op outside a scope."""
    if _scopes and out.numel():
        # The scope holds `out` until it closes, so no other tensor can take its address meanwhile.
        _scopes[-1][out.untyped_storage().data_ptr()] = (_Recipe(fn, inputs), out)
    return out


def scratch_output(key: str, shape, dtype: torch.dtype, device) -> torch.Tensor | None:
    """A fresh tensor of `shape` over a CPU storage shared by every call with this key, for an output the caller
    marks with `rebuild_in_backward` right away; valid until the next call with the key. None outside a scope or
    off the CPU (CUDA's caching allocator already reuses memory): the op allocates as usual."""
    if not _scopes or torch.device(device).type != "cpu":
        return None
    nbytes = math.prod(shape) * dtype.itemsize
    storage = _scratch.get((key, dtype))
    if storage is None or storage.nbytes() < nbytes:
        storage = _scratch[(key, dtype)] = torch.UntypedStorage(nbytes)
    return torch.empty(0, dtype=dtype).set_(storage, 0, tuple(shape))


def _pack(t: torch.Tensor):
    marked = _scopes[-1].get(t.untyped_storage().data_ptr()) if t.numel() else None
    if marked is None or marked[1].device != t.device:
        return t
    return marked[0], t.size(), t.stride(), t.storage_offset()


def _unpack(packed):
    if isinstance(packed, torch.Tensor):
        return packed
    recipe, size, stride, offset = packed
    return recipe.rebuild().as_strided(size, stride, offset)


@contextmanager
def rebuild_scope(enabled: bool = True):
    """The region whose marked activations are rebuilt in the backward (off when disabled or without grad)."""
    if not enabled or not torch.is_grad_enabled():
        yield
        return
    _scopes.append({})
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _scopes.pop()
