"""The kernel benchmark cases: shapes of LLaMA-2-7B and Mistral-7B, the implementations compared, and the analytic
cost of each op (FLOPs for the matmul-bound ops, bytes for the memory-bound ones).

A case builds fresh inputs and, per provider, a function of those inputs returning the op's output(s). The same
cases run tiny on the CPU (interpreter correctness sweep) and full size on a GPU.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from hippocrates.kernels import activation, cross_entropy, flash_attention, lora, rmsnorm, rope

MODELS = {
    # name: (hidden, intermediate, q heads, kv heads, head dim, vocab, sliding window)
    "llama2-7b": (4096, 11008, 32, 32, 128, 32000, None),
    "mistral-7b": (4096, 14336, 32, 8, 128, 32000, 4096),
}
TINY_MODELS = {
    "llama2-tiny": (64, 96, 4, 4, 32, 173, None),
    "mistral-tiny": (64, 112, 4, 2, 32, 173, 24),
}


@dataclass
class Case:
    op: str
    model: str
    seq: int
    shape: str
    make_inputs: Callable[[], list]  # fresh leaf tensors (those needing grad have requires_grad)
    providers: dict[str, Callable]  # provider name -> fn(*inputs) -> tensor or tuple of tensors
    cost_forward: float  # FLOPs or bytes of one forward
    cost_backward: float
    unit: str  # "flop" or "byte"
    reference: str = "reference"  # the provider other providers are checked against
    notes: dict = field(default_factory=dict)


def _optional_providers():
    """flash-attn and Liger-Kernel entry points, those that are installed (a provider that then fails is reported)."""
    found = {}
    imports = {
        "flash_attn": ("flash_attn", "flash_attn_func"),
        "liger_rms_norm": ("liger_kernel.ops.rms_norm", "LigerRMSNormFunction"),
        "liger_swiglu": ("liger_kernel.ops.swiglu", "LigerSiLUMulFunction"),
        "liger_rope": ("liger_kernel.transformers.rope", "liger_rotary_pos_emb"),
        "liger_flce": ("liger_kernel.ops.fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyFunction"),
    }
    for key, (module, name) in imports.items():
        try:
            found[key] = getattr(importlib.import_module(module), name)
        except Exception:
            continue
    for key in ("liger_rms_norm", "liger_swiglu", "liger_flce"):
        if key in found:
            found[key] = found[key].apply
    return found


def _randn(*shape, dtype, device, grad=True, scale=1.0):
    return (torch.randn(*shape, dtype=dtype, device=device) * scale).requires_grad_(grad)


def packed_ids(batch, t, doc_len, device):
    """[B, T] segment ids of documents of about doc_len tokens (a different cut per row), as packing makes them."""
    pos = torch.arange(t, device=device)
    return torch.stack([(pos + row * doc_len // 3) // doc_len for row in range(batch)])


def attention_cases(models, seqs, batch, dtype, device, extra):
    """Per model and length: plain causal in [B, H, T, D], and the training layout ([B, T, H, D] projections
    viewed as [B, H, T, D]) with packed documents, which is what every training step runs."""
    cases = []
    for name, (_, _, hq, hkv, d, _, window) in models.items():
        for t in seqs:
            b = batch

            def make(b=b, t=t, hq=hq, hkv=hkv, d=d):
                return [_randn(b, hq, t, d, dtype=dtype, device=device),
                        _randn(b, hkv, t, d, dtype=dtype, device=device),
                        _randn(b, hkv, t, d, dtype=dtype, device=device)]

            providers = {
                "triton": lambda q, k, v, w=window: flash_attention.attention_triton(q, k, v, True, w),
                "reference": lambda q, k, v, w=window: flash_attention.attention_reference(q, k, v, True, w),
            }
            if window is None or t <= window:  # SDPA's fused kernels take no window; below it, causal is the same
                providers["sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                   enable_gqa=True)
            if "flash_attn" in extra:
                fa = extra["flash_attn"]
                providers["flash_attn"] = lambda q, k, v, w=window: fa(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                    window_size=(-1, -1) if w is None else (w - 1, 0)).transpose(1, 2)
            fwd, bwd = flash_attention.attention_flops(b, hq, t, t, d, causal=True, sliding_window=window)
            cases.append(Case("attention", name, t, f"B={b} Hq={hq} Hkv={hkv} T={t} D={d} causal"
                              + (f" W={window}" if window else ""), make, providers, fwd, bwd, "flop",
                              notes=dict(head_dim=d)))
            cases.append(_packed_attention_case(name, b, t, hq, hkv, d, window, dtype, device))
    return cases


def _packed_attention_case(name, b, t, hq, hkv, d, window, dtype, device):
    ids = packed_ids(b, t, max(16, t // 4), device)  # about 4 documents per row

    def make():
        def heads(h):  # [B, T, H, D] -> [B, H, T, D] view, as the model's projections
            return torch.randn(b, t, h, d, dtype=dtype, device=device).transpose(1, 2).requires_grad_()
        return [heads(hq), heads(hkv), heads(hkv)]

    providers = {
        "triton": lambda q, k, v: flash_attention.attention_triton(q, k, v, True, window, segment_ids=ids),
        "torch": lambda q, k, v: flash_attention.attention_torch(q, k, v, True, window, segment_ids=ids),
        "reference": lambda q, k, v: flash_attention.attention_reference(q, k, v, True, window, segment_ids=ids),
    }
    fwd, bwd = flash_attention.attention_flops(b, hq, t, t, d, causal=True, sliding_window=window, segment_ids=ids)
    return Case("attention", f"{name}/packed", t, f"B={b} T={t} Hq={hq} Hkv={hkv} D={d} [B,T,H,D] causal, "
                f"~4 docs/row" + (f" W={window}" if window else ""), make, providers, fwd, bwd, "flop",
                notes=dict(head_dim=d))


def rmsnorm_cases(models, seqs, batch, dtype, device, extra):
    cases = []
    hidden = next(iter(models.values()))[0]
    for t in seqs:
        n = batch * t  # rows
        item = torch.finfo(dtype).bits // 8

        def make(n=n):
            return [_randn(n, hidden, dtype=dtype, device=device), 1 + _randn(hidden, dtype=dtype, device=device,
                                                                                grad=False, scale=0.1).requires_grad_()]

        providers = {"triton": lambda x, w: rmsnorm.rms_norm_triton(x, w, 1e-5),
                     "reference": lambda x, w: rmsnorm.rms_norm_reference(x, w, 1e-5)}
        if "liger_rms_norm" in extra:
            providers["liger"] = lambda x, w, f=extra["liger_rms_norm"]: f(x, w, 1e-5)
        # forward reads x, writes y; backward reads x and dy, writes dx (weight and rstd are negligible)
        cases.append(Case("rmsnorm", "7b", t, f"rows={n} H={hidden}", make, providers, 2 * n * hidden * item,
                          3 * n * hidden * item, "byte"))
    return cases


def swiglu_cases(models, seqs, batch, dtype, device, extra):
    cases = []
    for name, (_, inter, *_rest) in models.items():
        for t in seqs:
            n = batch * t
            item = torch.finfo(dtype).bits // 8

            def make(n=n, inter=inter):
                return [_randn(n, inter, dtype=dtype, device=device), _randn(n, inter, dtype=dtype, device=device)]

            providers = {"triton": activation.swiglu_triton, "reference": activation.swiglu_reference}
            if "liger_swiglu" in extra:
                providers["liger"] = extra["liger_swiglu"]
            cases.append(Case("swiglu", name, t, f"rows={n} I={inter}", make, providers, 3 * n * inter * item,
                              5 * n * inter * item, "byte"))
    return cases


def rope_cases(models, seqs, batch, dtype, device, extra):
    cases = []
    for name, (_, _, hq, hkv, d, _, _) in models.items():
        for t in seqs:
            b = batch
            item = torch.finfo(dtype).bits // 8

            def make(b=b, t=t, hq=hq, hkv=hkv, d=d):
                # the model's layout: [B, T, H, D] projections viewed as [B, H, T, D]
                q = torch.randn(b, t, hq, d, dtype=dtype, device=device).transpose(1, 2).requires_grad_()
                k = torch.randn(b, t, hkv, d, dtype=dtype, device=device).transpose(1, 2).requires_grad_()
                angles = torch.rand(b, t, d, device=device) * 100
                return [q, k, angles.cos().to(dtype), angles.sin().to(dtype)]

            providers = {"triton": rope.apply_rope_triton, "reference": rope.apply_rope_reference}
            if "liger_rope" in extra:
                providers["liger"] = lambda q, k, c, s, f=extra["liger_rope"]: f(q, k, c, s)
            moved = 2 * b * t * (hq + hkv) * d * item  # read and write q and k once
            cases.append(Case("rope", name, t, f"B={b} T={t} Hq={hq} Hkv={hkv} D={d}", make, providers, moved,
                              moved, "byte"))
    return cases


def lora_cases(models, seqs, batch, dtype, device, extra, ranks=(16, 64, 128)):
    """The gate projection with an adapter at each rank: the Triton kernel against the torch side (what CUDA runs
    by default: two cuBLAS matmuls and an in-place addmm_)."""
    cases = []
    for (name, (hidden, inter, *_rest)), t, rank in ((m, t, r) for m in models.items() for t in seqs
                                                   for r in ranks):
        m = batch * t
        k, n, r = hidden, inter, rank  # the gate projection

        def make(m=m, k=k, n=n, r=r):
            return [_randn(m, k, dtype=dtype, device=device),
                    _randn(n, k, dtype=dtype, device=device, grad=False, scale=k ** -0.5),
                    _randn(r, k, dtype=dtype, device=device, scale=k ** -0.5),
                    _randn(n, r, dtype=dtype, device=device, scale=r ** -0.5)]

        providers = {"triton": lambda x, w, a, b_: lora.lora_linear_triton(x, w, a, b_, 2.0),
                     "torch": lambda x, w, a, b_: lora.lora_linear_torch(x, w, a, b_, 2.0),
                     "reference": lambda x, w, a, b_: lora.lora_linear_reference(x, w, a, b_, 2.0)}
        fwd = 2 * m * k * n + 2 * m * k * r + 2 * m * r * n
        bwd = 2 * m * n * k + 2 * m * n * r + 2 * m * r * k + 2 * m * r * k + 2 * m * n * r  # dx, dxa, dA, dB
        cases.append(Case("lora", f"{name}/r{r}", t, f"M={m} K={k} N={n} r={r}", make, providers, fwd, bwd,
                          "flop"))
    return cases


def cross_entropy_cases(models, seqs, batch, dtype, device, extra):
    cases = []
    hidden, vocab = next(iter(models.values()))[0], next(iter(models.values()))[5]
    for t in seqs:
        n = batch * t

        def make(n=n):
            labels = torch.randint(0, vocab, (n,), device=device)
            labels[: n // 10] = -100
            return [_randn(n, hidden, dtype=dtype, device=device),
                    _randn(vocab, hidden, dtype=dtype, device=device, scale=hidden ** -0.5), labels]

        providers = {"triton": cross_entropy.fused_linear_cross_entropy_triton,
                     "reference": cross_entropy.fused_linear_cross_entropy_reference}
        if "liger_flce" in extra:
            providers["liger"] = lambda h, w, y, f=extra["liger_flce"]: f(h, w, y)
        # useful work: logits 2NHV forward; dh and dW 4NHV backward (the fused op does all three in its forward)
        cases.append(Case("cross_entropy", "7b", t, f"N={n} H={hidden} V={vocab}", make, providers,
                          2 * n * hidden * vocab, 4 * n * hidden * vocab, "flop"))
    return cases


ALL_OPS = {"attention": attention_cases, "rmsnorm": rmsnorm_cases, "swiglu": swiglu_cases, "rope": rope_cases,
           "lora": lora_cases, "cross_entropy": cross_entropy_cases}


def build_cases(ops, models, seqs, batch, dtype, device):
    extra = _optional_providers()
    return [case for op in ops for case in ALL_OPS[op](models, seqs, batch, dtype, device, extra)]


def grad_inputs(inputs):
    return [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def relative_error(actual, expected):
    scale = max(expected.double().abs().max().item(), 1e-6)
    return (actual.double() - expected.double()).abs().max().item() / scale if math.isfinite(scale) else float("nan")
