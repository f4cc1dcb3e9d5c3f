"""Helpers shared by the kernel tests: float64 comparison, poisoned allocations, saved-activation accounting."""
import contextlib

import pytest
import torch

# Largest allowed max|actual - expected| / max|expected| against a float64 reference, per dtype of the inputs.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def dtypes_to_test():
    """fp32 and fp16 everywhere; bf16 only on a GPU (the interpreter computes bf16 wrongly)."""
    params = [torch.float32, torch.float16]
    cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs a GPU (the interpreter is wrong)")
    return params + [pytest.param(torch.bfloat16, marks=cuda)]


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def assert_close64(actual, expected, dtype, name, scale=1.0):
    """Compare with a float64 reference; the error is relative to the reference's largest magnitude."""
    assert actual is not None, f"{name}: no gradient"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (an unwritten poisoned element?)"
    expected = expected.double()
    error = (actual.double() - expected).abs().max().item() if actual.numel() else 0.0
    reference = max(expected.abs().max().item() if expected.numel() else 0.0, 1e-6)
    tol = TOLERANCE[dtype] * scale
    assert error <= tol * reference, f"{name} ({dtype}): max error {error:.3g} > {tol:.1g} x max|ref| {reference:.3g}"


def as_float64_leaves(*tensors):
    return [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


@contextlib.contextmanager
def poisoned_allocations():
    """torch.empty / torch.empty_like return NaN-filled floating tensors, so elements a kernel forgets to write fail."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    def empty(*args, **kwargs):
        return poison(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return poison(real_empty_like(*args, **kwargs))

    torch.empty, torch.empty_like = empty, empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


@pytest.fixture
def poisoned():
    with poisoned_allocations():
        yield


def saved_bytes(fn, *inputs, exclude=()):
    """Bytes of distinct storages autograd keeps for the backward of fn(*inputs), not counting `exclude`."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    return sum(storages.values()), out
