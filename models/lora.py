"""LoRA adapters on the model's Linear layers, and their PEFT-format export."""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .transformer import Transformer

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraConfig:
    rank: int = 16  # 0 = full fine-tuning (no adapters)
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def add_lora(model: Transformer, config: LoraConfig, seed: int | None = None) -> Transformer:
    """Attach A [r, in] (Kaiming-uniform, as PEFT) and B [out, r] (zeros) to every targeted Linear; freeze the rest."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    targets = [(name, m) for name, m in model.linear_layers() if name.rsplit(".", 1)[-1] in config.target_modules]
    if not targets:
        raise ValueError(f"lora.target_modules={config.target_modules} matches no layer; choose from {ALL_LINEAR}")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, linear in targets:
        out_features, in_features = linear.weight.shape
        dtype, device = linear.weight.dtype, linear.weight.device
        a = lora_a_init(config.rank, in_features, generator)
        linear.lora_a = nn.Parameter(a.to(dtype=dtype, device=device))
        linear.lora_b = nn.Parameter(torch.zeros(out_features, config.rank, dtype=dtype, device=device))
        linear.lora_scale = config.scale
        linear.lora_dropout = config.dropout
    return model


def lora_a_init(rank: int, in_features: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A [rank, in] drawn as PEFT does: kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound


def lora_layers(model: nn.Module):
    from .transformer import Linear
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Linear) and m.lora_a is not None]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model's function inside the block (DPO's reference policy for LoRA runs)."""
    layers = [m for _, m in lora_layers(model)]
    for m in layers:
        m.lora_enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.lora_enabled = True


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors under PEFT's names: base_model.model.<module>.lora_A.weight / lora_B.weight."""
    out = {}
    for name, m in lora_layers(model):
        out[f"base_model.model.{name}.lora_A.weight"] = m.lora_a.detach()
        out[f"base_model.model.{name}.lora_B.weight"] = m.lora_b.detach()
    return out


def save_peft_adapter(state: dict[str, torch.Tensor], config: LoraConfig, out_dir: str | Path, base_model: str = ""):
    """adapter_config.json + adapter_model.safetensors, loadable by `peft.PeftModel.from_pretrained`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in state.items()}, str(out_dir / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model),
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": sorted(config.target_modules), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "use_rslora": False, "modules_to_save": None, "init_lora_weights": True,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return out_dir
