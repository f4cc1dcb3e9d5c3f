"""CPU training paths: each op's `*_torch` side against its plain `*_reference` at the shapes of the CPU training
workload (SmolLM2-135M, batch 4 x seq 512, LoRA rank 16, fp32, 2 threads).

Per op, one fresh process times forward + backward of both sides alternately (best of N and median: on a shared
2-core machine the minimum is the least noisy estimate), and one fresh process per side measures the peak resident
memory above the inputs (VmHWM reset through /proc/self/clear_refs; glibc's mmap threshold is pinned so freed
tensors leave the resident set at once) and the bytes autograd keeps between forward and backward. The last row
is a whole LoRA training step of a SmolLM2-135M cut to a few layers, every op on one side.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import multiprocessing
import os
import statistics
import time

import torch

BATCH, SEQ, HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB, RANK = 4, 512, 576, 1536, 9, 3, 64, 49152, 16


def _rope_tables():
    from hippocrates.models.transformer import rope_cos_sin
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    return rope_cos_sin(positions, HEAD_DIM, 100000.0, torch.float32)


def _case(op: str, side: str):
    """(inputs, fn, tensors to differentiate and not to count as saved) for one op and side."""
    from hippocrates.kernels import activation, cross_entropy, flash_attention, lora, rmsnorm, rope
    pick = lambda module, name: getattr(module, f"{name}_{side}")  # noqa: E731
    tokens = BATCH * SEQ
    if op == "rmsnorm":
        inputs = [torch.randn(BATCH, SEQ, HIDDEN, requires_grad=True), torch.ones(HIDDEN)]
        fn = lambda x, w, f=pick(rmsnorm, "rms_norm"): f(x, w, 1e-5)  # noqa: E731
    elif op == "swiglu":
        inputs = [torch.randn(BATCH, SEQ, INTER, requires_grad=True),
                  torch.randn(BATCH, SEQ, INTER, requires_grad=True)]
        fn = pick(activation, "swiglu")
    elif op == "rope":
        cos, sin = _rope_tables()
        inputs = [torch.randn(BATCH, SEQ, HEADS, HEAD_DIM).transpose(1, 2).requires_grad_(),
                  torch.randn(BATCH, SEQ, KV_HEADS, HEAD_DIM).transpose(1, 2).requires_grad_(), cos, sin]
        fn = pick(rope, "apply_rope")
    elif op == "lora":
        inputs = [torch.randn(BATCH, SEQ, HIDDEN, requires_grad=True), torch.randn(INTER, HIDDEN) * HIDDEN ** -0.5,
                  (torch.randn(RANK, HIDDEN) * HIDDEN ** -0.5).requires_grad_(),
                  (torch.randn(INTER, RANK) * 0.1).requires_grad_()]
        fn = lambda x, w, a, b, f=pick(lora, "lora_linear"): f(x, w, a, b, 2.0)  # noqa: E731
    elif op == "attention":
        inputs = [torch.randn(BATCH, SEQ, HEADS, HEAD_DIM).transpose(1, 2).requires_grad_(),
                  torch.randn(BATCH, SEQ, KV_HEADS, HEAD_DIM).transpose(1, 2).requires_grad_(),
                  torch.randn(BATCH, SEQ, KV_HEADS, HEAD_DIM).transpose(1, 2).requires_grad_()]
        fn = lambda q, k, v, f=pick(flash_attention, "attention"): f(q, k, v, causal=True)  # noqa: E731
    elif op == "cross_entropy":
        labels = torch.randint(0, VOCAB, (tokens,))
        labels[:: 7] = -100
        inputs = [torch.randn(tokens, HIDDEN, requires_grad=True), torch.randn(VOCAB, HIDDEN) * 0.05, labels]
        fn = pick(cross_entropy, "fused_linear_cross_entropy")
    elif op == "model_step":
        return _model_step_case(side)
    else:
        raise ValueError(f"unknown op {op!r}")
    return inputs, fn, [t for t in inputs if t.requires_grad]


STEP_LAYERS = 4


def _model_step_case(side):
    """A LoRA training step (loss through the fused LM head) of SmolLM2-135M cut to STEP_LAYERS layers."""
    from hippocrates.kernels import ops
    from hippocrates.models.config import PRESETS
    from hippocrates.models.lora import LoraConfig, add_lora
    from hippocrates.models.transformer import Transformer
    model = Transformer(PRESETS["smollm2-135m"].replace(num_layers=STEP_LAYERS)).init_weights(seed=0)
    add_lora(model, LoraConfig(rank=RANK, alpha=32.0), seed=0)
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ))

    def loss_fn(ids):
        with _references_as_torch_paths(side == "reference"):
            hidden = model(ids, return_hidden=True)  # [B, T, H]
            return ops.fused_linear_cross_entropy(hidden[:, :-1], model.output_weight, ids[:, 1:])

    return [input_ids], loss_fn, list(model.parameters())


def torch_sides():
    """(module, name) of every op whose torch side `name`_torch has a `name`_reference."""
    from hippocrates.kernels import activation, cross_entropy, flash_attention, lora, rmsnorm, rope
    return [(rmsnorm, "rms_norm"), (activation, "swiglu"), (rope, "apply_rope"), (lora, "lora_linear"),
            (lora, "lora_linears"), (flash_attention, "attention"), (cross_entropy, "fused_linear_cross_entropy")]


@contextlib.contextmanager
def _references_as_torch_paths(active: bool):
    """Inside: every op's `*_torch` is its plain `*_reference` (the dispatch looks the name up at each call), which
    takes and ignores the torch side's buffer arguments (`out`, `shared_silu`).

    Autograd keeps the functions it recorded, so the backward after the block still runs the reference's graph.
    """
    names = torch_sides()
    saved = {(module, name): getattr(module, f"{name}_torch") for module, name in names}
    if active:
        for module, name in names:
            reference = getattr(module, f"{name}_reference")
            setattr(module, f"{name}_torch", lambda *args, _reference=reference, out=None, shared_silu=None, **kwargs:
                    _reference(*args, **kwargs))
    try:
        yield
    finally:
        for (module, name), fn in saved.items():
            setattr(module, f"{name}_torch", fn)


OPS = ["rmsnorm", "swiglu", "rope", "lora", "attention", "cross_entropy", "model_step"]
SHAPES = {
    "rmsnorm": f"x [{BATCH}, {SEQ}, {HIDDEN}], frozen weight",
    "swiglu": f"gate, up [{BATCH}, {SEQ}, {INTER}]",
    "rope": f"q [{BATCH}, {HEADS}, {SEQ}, {HEAD_DIM}], k [{BATCH}, {KV_HEADS}, {SEQ}, {HEAD_DIM}]",
    "lora": f"x [{BATCH}, {SEQ}, {HIDDEN}] -> {INTER}, rank {RANK}, frozen W",
    "attention": f"q [{BATCH}, {HEADS}, {SEQ}, {HEAD_DIM}], kv heads {KV_HEADS}, causal",
    "cross_entropy": f"hidden [{BATCH * SEQ}, {HIDDEN}], frozen W [{VOCAB}, {HIDDEN}]",
    "model_step": f"SmolLM2-135M with {STEP_LAYERS} of 30 layers, LoRA r{RANK}, B={BATCH} T={SEQ}, loss + backward",
}


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _step(fn, inputs, wanted):
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.grad(outs, wanted, [torch.ones_like(o) for o in outs])


def _saved_bytes(fn, inputs, exclude):
    skip = {t.untyped_storage().data_ptr() for t in list(inputs) + list(exclude)}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    del out
    return sum(storages.values())


def _prepare(op, side):
    inputs, fn, wanted_and_kept = _case(op, side)
    return inputs, fn, [t for t in wanted_and_kept if t.requires_grad], wanted_and_kept


def measure_memory(op: str, side: str) -> dict:
    """In a fresh process: peak resident memory of forward + backward above the inputs, and the saved bytes."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    inputs, fn, wanted, kept = _prepare(op, side)
    saved = _saved_bytes(fn, inputs, kept)
    _step(fn, inputs, wanted)  # warm-up (lazy initializations)
    gc.collect()
    baseline_kb = _rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as reset:
        reset.write("5")  # VmHWM := VmRSS
    _step(fn, inputs, wanted)
    return dict(peak_mb=(_rss_kb("VmHWM") - baseline_kb) / 1024, saved_mb=saved / 2 ** 20)


def measure_time(op: str, repeats: int) -> dict:
    """In a fresh process: forward + backward of both sides, alternating, so load from other processes hits both."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    prepared = {side: _prepare(op, side) for side in SIDES}
    times = {side: [] for side in SIDES}
    for side, (inputs, fn, wanted, _) in prepared.items():
        _step(fn, inputs, wanted)  # warm-up
    for _ in range(repeats):
        for side, (inputs, fn, wanted, _) in prepared.items():
            start = time.perf_counter()
            _step(fn, inputs, wanted)
            times[side].append(1e3 * (time.perf_counter() - start))
    return {side: (min(t), statistics.median(t)) for side, t in times.items()}


SIDES = ("reference", "torch")


def _in_fresh_process(fn, *args):
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def compare_sides(ops=OPS, repeats: int = 5, progress=None) -> list[dict]:
    """Per op: alternating timing of both sides in one process, then each side's memory in its own process."""
    rows = []
    saved_env = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 16)  # read by each fresh child's malloc
    try:
        for op in (progress(ops) if progress else ops):
            timings = _in_fresh_process(measure_time, op, repeats)
            for side in SIDES:
                best, median = timings[side]
                rows.append(dict(op=op, side=side, shape=SHAPES[op], ms=best, ms_median=median,
                                 **_in_fresh_process(measure_memory, op, side)))
    finally:
        if saved_env is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved_env
    return rows
