"""What `eval.run` scores: a checkpoint (HF dir, training out_dir, .gguf), optionally with a PEFT LoRA adapter merged
in, in the dtype the checkpoint was saved in unless told otherwise.

Adapters: `--adapter DIR`, or the adapter dir itself as `--model` (its adapter_config.json names the base model in
`base_model_name_or_path`). The adapter is merged into the base weights, W + (alpha / r) B A (alpha / sqrt(r) with
rsLoRA), which is what peft's `merge_and_unload` computes, so scoring runs at the base model's speed.

dtype `auto` (lm-evaluation-harness's default): the checkpoint's own dtype, read from config.json (`torch_dtype`, or
`dtype` as transformers 5 writes it); float32 when the file names none (a dequantized .gguf). On a CPU, a half
precision checkpoint is scored in float32, since these CPUs have no fast bf16 / fp16 matmul; results.json records
both the dtype used and the checkpoint's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .records import EvalError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DTYPES = ("auto", "float32", "bfloat16", "float16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    base: str  # the checkpoint the weights came from
    adapter: str | None  # the merged PEFT adapter dir
    dtype: str  # what the model runs in
    checkpoint_dtype: str | None  # what the checkpoint says it was saved in


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise EvalError(f"{path}: cannot read the adapter config ({err})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise EvalError(f"{path}: peft_type {config.get('peft_type')!r}, only LORA adapters can be merged")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise EvalError(f"{path}: missing key {key!r}")
    return config


def resolve_model_and_adapter(model: str, adapter: str | None) -> tuple[str, Path | None]:
    """(base checkpoint, adapter dir or None); an adapter dir given as the model names its base in its config."""
    if adapter is None and is_adapter_dir(model):
        adapter = model
        model = read_adapter_config(Path(model)).get("base_model_name_or_path") or ""
        if not model or not Path(model).exists():
            raise EvalError(f"{Path(adapter) / ADAPTER_CONFIG}: base_model_name_or_path {model!r} is not a local "
                            f"checkpoint; pass --model BASE --adapter {adapter}")
    if adapter is not None and not is_adapter_dir(adapter):
        raise EvalError(f"{adapter}: not a PEFT adapter dir (no {ADAPTER_CONFIG})")
    return model, Path(adapter) if adapter is not None else None


def checkpoint_dtype(path: str | Path) -> str | None:
    from hippocrates.models.checkpoint import resolve_checkpoint_dir
    config_file = resolve_checkpoint_dir(Path(path)) / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise EvalError(f"{config_file}: not valid JSON ({err.msg})") from None
    value = config.get("torch_dtype") or config.get("dtype")
    return str(value).removeprefix("torch.") if value else None


def choose_dtype(requested: str, saved: str | None, device: str) -> str:
    if requested not in DTYPES:
        raise EvalError(f"--dtype {requested!r}: expected one of {', '.join(DTYPES)}")
    if requested != "auto":
        return requested
    if saved not in ("float32", "bfloat16", "float16"):
        return "float32"
    return "float32" if str(device) == "cpu" else saved


@torch.no_grad()
def merge_lora_adapter(model: torch.nn.Module, adapter_dir: Path) -> int:
    """W += scale * B @ A for every adapted Linear, in float32, then back to W's dtype; returns how many."""
    from safetensors.torch import load_file
    config = read_adapter_config(adapter_dir)
    weights_file = adapter_dir / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        raise EvalError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}")
    state = load_file(str(weights_file))
    rank, alpha = config["r"], config["lora_alpha"]
    scale = alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank
    modules = dict(model.named_modules())
    merged = 0
    for key, lora_a in state.items():
        if ".lora_A." not in key:
            continue
        module_name = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        lora_b = state.get(key.replace(".lora_A.", ".lora_B."))
        linear = modules.get(module_name)
        if lora_b is None or linear is None or not hasattr(linear, "weight"):
            raise EvalError(f"{weights_file}: {key} matches no layer of the base model (or has no lora_B)")
        weight = linear.weight  # [out, in]
        delta = scale * lora_b.float() @ lora_a.float()  # [out, r] @ [r, in]
        if delta.shape != weight.shape:
            raise EvalError(f"{weights_file}: {key} gives a {tuple(delta.shape)} update for a {tuple(weight.shape)} "
                            f"weight")
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
        merged += 1
    if not merged:
        raise EvalError(f"{weights_file}: holds no lora_A / lora_B tensors")
    return merged


def load_for_eval(model: str, adapter: str | None = None, dtype: str = "auto", device: str = "cpu") -> LoadedModel:
    from hippocrates.models import load_model, load_tokenizer
    base, adapter_dir = resolve_model_and_adapter(str(model), adapter)
    saved = checkpoint_dtype(base) if not str(base).endswith(".gguf") else None
    chosen = choose_dtype(dtype, saved, device)
    net = load_model(base, dtype=getattr(torch, chosen), device=device)
    tokenizer_source = base
    if adapter_dir is not None:
        merge_lora_adapter(net, adapter_dir)
        if any((adapter_dir / name).is_file() for name in TOKENIZER_FILES):
            tokenizer_source = adapter_dir
    return LoadedModel(net, load_tokenizer(tokenizer_source), str(base),
                       str(adapter_dir) if adapter_dir else None, chosen, saved)
