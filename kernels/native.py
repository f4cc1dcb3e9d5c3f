"""The CPU's fused elementwise kernels (kernels/cpu_fused.c): built once per machine with the system C compiler,
loaded with ctypes, run on torch's fp32 tensors in place of chains of torch ops.

The shared library is cached under `models.paths.cache_dir()/native`, keyed by the source, the compiler and the
CPU's flags (it is built with -march=native), so a rebuild happens only when one of them changes; ranks that
build at the same time each write their own file and rename it into place. Without a working compiler (or off
Linux) `available()` is False, one warning says why, and the callers run their torch ops instead.

The flags (kernels/cpu_fused.c says why): no -ffast-math, which would also make gcc before 13 link crtfastmath.o
into the library, flushing denormals to zero for the whole process when it loads (kernels/test_native.py checks).

A call covers its range of elements or rows; `parallel_ranges` cuts the range between torch.get_num_threads()
single-threaded Python workers (ctypes releases the GIL during the call), which the CPU attention also runs on.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_fused.c")
COMPILE_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
                 "-fno-signed-zeros", "-fopenmp-simd", "-fPIC", "-shared", "-std=c99"]
MIN_PARALLEL_ELEMENTS = 1 << 15  # below this one thread does the call: a worker hand-off costs tens of microseconds

_P, _N, _F = ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_float
SIGNATURES = {
    "swiglu_forward": [_P, _P, _P, _N],
    "swiglu_backward": [_P, _P, _P, _P, _P, _N],
    "rms_norm_forward": [_P, _P, _F, _P, _P, _N, _N],
    "rms_norm_backward": [_P, _P, _P, _P, _P, _N, _N],
    "cross_entropy_rows": [_P, _P, _P, _P, _N, _N, ctypes.c_longlong, ctypes.c_int],
    "rope": [_P, _P, _P, _P, _N, _N, _N, ctypes.c_int],
    "attention_forward_block": [_P, _P, _P, _N, _N, _N, _N, _N],
    "attention_backward_probs": [_P, _P, _N, _N, _N, _N, _N, _N],
    "attention_backward_dscores": [_P, _P, _P, _N, _N, _N, _N],
}

_library: ctypes.CDLL | None = None
_build_error: str | None = None
_lock = threading.Lock()


def _cpu_flags() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line for line in lines if line.startswith(("flags", "Features"))), "")


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, _cpu_flags(), *COMPILE_FLAGS]).encode())
    from hippocrates.models.paths import cache_dir
    target = cache_dir() / "native" / f"cpu_fused-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        lib = Path(scratch) / target.name
        command = [compiler, *COMPILE_FLAGS, str(SOURCE), "-o", str(lib), *_math_libraries(compiler)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(command)}` failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        os.replace(lib, target)
    return target


def _math_libraries(compiler: str) -> list[str]:
    """-lm, and glibc's vector math library (the vectorized expf) where the compiler finds one."""
    found = subprocess.run([compiler, "-print-file-name=libmvec.so"], capture_output=True, text=True).stdout.strip()
    return ["-lmvec", "-lm"] if os.path.isabs(found) else ["-lm"]


def library() -> ctypes.CDLL | None:
    """The loaded kernels, built on first use; None (after one warning) where they cannot be built."""
    global _library, _build_error
    if _library is not None or _build_error is not None:
        return _library
    with _lock:
        if _library is None and _build_error is None:
            compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
            try:
                if not sys.platform.startswith("linux") or compiler is None:
                    raise RuntimeError("needs Linux and a C compiler (cc, gcc or $CC)")
                loaded = ctypes.CDLL(str(_build(compiler)))
                for name, argtypes in SIGNATURES.items():
                    getattr(loaded, name).argtypes = argtypes
                    getattr(loaded, name).restype = None
                _library = loaded
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                _build_error = str(error)
                warnings.warn(f"hippocrates: the fused CPU kernels are off ({_build_error}); torch ops run instead",
                              stacklevel=2)
    return _library


def available() -> bool:
    return library() is not None


def _takes(t: torch.Tensor, contiguous: bool) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and (t.is_contiguous() or not contiguous)


def usable(*tensors: torch.Tensor, contiguous: bool = True) -> bool:
    """Every tensor an fp32 CPU tensor (and contiguous, unless the op copes with any layout), and the kernels
    built."""
    return all(_takes(t, contiguous) for t in tensors) and available()


def require(op: str, *tensors: torch.Tensor, contiguous: bool = True) -> None:
    """A clear error where the native side cannot take these tensors."""
    for t in tensors:
        if not _takes(t, contiguous):
            raise ValueError(f"{op}: the native side takes {'contiguous ' if contiguous else ''}fp32 CPU tensors, "
                             f"got {t.dtype} on {t.device.type} (contiguous: {t.is_contiguous()}); "
                             f"HIPPO_KERNELS=torch takes any")
    if not available():
        raise RuntimeError(f"{op}: the native kernels are off ({_build_error}); HIPPO_KERNELS=torch runs without")


_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, the pool)


def worker_pool(workers: int) -> ThreadPoolExecutor:
    """`workers` Python threads whose torch ops each run on one intra-op thread (made once per process).

    torch.set_num_threads is per thread for OpenMP and MKL, but it also stores the count new threads start from,
    so the caller's count is set back once every worker has set its own."""
    global _pool
    if _pool is None or _pool[:2] != (os.getpid(), workers):  # a forked child has none of its parent's threads
        caller_threads = torch.get_num_threads()
        started = threading.Barrier(workers)
        pool = ThreadPoolExecutor(workers, thread_name_prefix="hippo-cpu")
        # get_num_threads first: a thread's first call sets its count from the stored one, which would undo ours
        list(pool.map(lambda _: (torch.get_num_threads(), torch.set_num_threads(1), started.wait()), range(workers)))
        torch.set_num_threads(caller_threads)
        _pool = (os.getpid(), workers, pool)
    return _pool[2]


def parallel_ranges(call, total: int, work_per_item: int = 1) -> None:
    """call(start, end) over [0, total), cut into one contiguous range per torch thread."""
    workers = min(torch.get_num_threads(), total)
    if workers <= 1 or total * work_per_item < MIN_PARALLEL_ELEMENTS:
        if total:
            call(0, total)
        return
    bounds = [total * i // workers for i in range(workers + 1)]
    list(worker_pool(workers).map(lambda i: call(bounds[i], bounds[i + 1]), range(workers)))


def _at(t: torch.Tensor, offset: int) -> int:
    """The address of element `offset` of a contiguous fp32 tensor."""
    return t.data_ptr() + 4 * offset


def swiglu_forward(gate, up, out=None):
    """silu(gate) * up -> out (a fresh tensor unless given). Contiguous fp32 CPU tensors of one shape."""
    out = torch.empty_like(gate) if out is None else out
    kernel = library().swiglu_forward
    parallel_ranges(lambda s, e: kernel(_at(gate, s), _at(up, s), _at(out, s), e - s), gate.numel())
    return out


def swiglu_backward(dy, gate, up):
    """-> (dgate, dup) of silu(gate) * up."""
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    kernel = library().swiglu_backward
    parallel_ranges(lambda s, e: kernel(_at(dy, s), _at(gate, s), _at(up, s), _at(dgate, s), _at(dup, s), e - s),
                    gate.numel())
    return dgate, dup


def rms_norm_forward(x, weight, eps, out=None):
    """x [..., N] -> (x / rms(x) * weight [..., N], rstd [...]). out: the result's buffer (else a fresh one)."""
    cols = x.shape[-1]
    rows = x.numel() // cols if cols else 0
    out = torch.empty_like(x) if out is None else out
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32)
    kernel = library().rms_norm_forward
    parallel_ranges(lambda s, e: kernel(_at(x, s * cols), weight.data_ptr(), eps, _at(out, s * cols), _at(rstd, s),
                                        e - s, cols), rows, cols)
    return out, rstd


def rms_norm_backward(dy, x, weight, rstd):
    """-> dx of rms_norm_forward, from its rstd."""
    cols = x.shape[-1]
    rows = x.numel() // cols if cols else 0
    dx = torch.empty_like(x)
    kernel = library().rms_norm_backward
    parallel_ranges(lambda s, e: kernel(_at(dy, s * cols), _at(x, s * cols), weight.data_ptr(), _at(rstd, s),
                                        _at(dx, s * cols), e - s, cols), rows, cols)
    return dx


def cross_entropy_rows(logits, labels, loss, row_scale, ignore_index, write_grad):
    """kernels/cross_entropy.py's rows contract: logits [C, V] fp32 (contiguous), labels [C] int64 (in range or
    ignore_index) -> loss [C]; with write_grad, returns the gradient written over the logits."""
    rows, vocab = logits.shape
    labels = labels.to(torch.int64).contiguous()
    kernel = library().cross_entropy_rows
    scale_at = (lambda s: _at(row_scale, s)) if row_scale is not None else (lambda s: None)
    parallel_ranges(lambda s, e: kernel(_at(logits, s * vocab), labels.data_ptr() + 8 * s, _at(loss, s),
                                        scale_at(s), e - s, vocab, ignore_index, int(write_grad)), rows, vocab)
    return logits if write_grad else None


def rope(x, cos, sin, adjoint=False):
    """x [B, H, T, D], a view of contiguous [B, T, H, D] memory; cos, sin [B, T, D] contiguous -> the rotated x
    (the transposed rotation with adjoint), in the same layout."""
    b, h, t, d = x.shape
    out = torch.empty(b, t, h, d, dtype=x.dtype).transpose(1, 2)
    kernel = library().rope
    parallel_ranges(lambda s, e: kernel(_at(x, s * h * d), _at(cos, s * d), _at(sin, s * d), _at(out, s * h * d),
                                        e - s, h, d, int(adjoint)), b * t, h * d)
    return out


# One block of kernels/cpu_attention.py's causal loop: called on its single-threaded workers, so not split further.
# scores, logits, dprobs, probs [heads, rows, keys] contiguous; lse, delta [heads, rows, 1] with any head stride.

def attention_forward_block(scores, t0: int, group: int):
    """scores -> exp2(scores - row_max) in place (0 after each row's last visible key); -> row_max, row_sum."""
    heads, rows, keys = scores.shape
    row_max, row_sum = (torch.empty(heads, rows, 1, dtype=torch.float32) for _ in range(2))
    library().attention_forward_block(scores.data_ptr(), row_max.data_ptr(), row_sum.data_ptr(), heads, rows, keys,
                                      t0, group)
    return row_max, row_sum


def attention_backward_probs(logits, lse, t0: int, group: int):
    """logits -> exp2(logits - lse) in place (0 after each row's last visible key)."""
    heads, rows, keys = logits.shape
    library().attention_backward_probs(logits.data_ptr(), lse.data_ptr(), lse.stride(0), heads, rows, keys, t0, group)
    return logits


def attention_backward_dscores(dprobs, probs, delta):
    """dprobs -> probs * (dprobs - delta) in place."""
    heads, rows, keys = dprobs.shape
    library().attention_backward_dscores(dprobs.data_ptr(), probs.data_ptr(), delta.data_ptr(), delta.stride(0), heads,
                                         rows, keys)
    return dprobs


def heads_last(x: torch.Tensor) -> bool:
    """x [B, H, T, D] is a view of contiguous [B, T, H, D] memory (the projections' output, as attention takes it)."""
    return x.transpose(1, 2).is_contiguous()
