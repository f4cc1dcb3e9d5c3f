"""One config for every LLaMA-2 / Mistral shaped model, read from and written to Hugging Face `config.json`."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}


class CheckpointError(ValueError):
    """A checkpoint or config that cannot be loaded; the message names the file and the key or tensor."""


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None  # defaults to hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # Mistral: a query sees itself and the previous sliding_window - 1 keys
    architecture: str = "llama"  # "llama" or "mistral": only the name written back to config.json differs
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.head_dim % 2:
            raise CheckpointError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(f"unknown architecture {self.architecture!r}; supported: {sorted(SUPPORTED_ARCHITECTURES)}")

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        """Build from a Hugging Face config dict; `source` names the file in error messages."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"{source}: unknown architecture model_type={model_type!r}; supported: {sorted(SUPPORTED_ARCHITECTURES)}")
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key):
                raise CheckpointError(f"{source}: {key}=true is not supported")
        rope_scaling = hf.get("rope_scaling")
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
            raise CheckpointError(f"{source}: rope_scaling={rope_scaling} is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (only silu)")
        try:
            return cls(
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                num_layers=hf["num_hidden_layers"],
                num_heads=hf["num_attention_heads"],
                num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                head_dim=hf.get("head_dim"),
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
                max_position_embeddings=hf.get("max_position_embeddings", 4096),
                tie_word_embeddings=hf.get("tie_word_embeddings", False),
                sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
                architecture=model_type,
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=_first(hf.get("eos_token_id")),
                pad_token_id=hf.get("pad_token_id"),
            )
        except KeyError as missing:
            raise CheckpointError(f"{source}: missing key {missing.args[0]!r}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: config.json not found")
        try:
            hf = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: not valid JSON ({err})") from None
        return cls.from_hf(hf, source=str(path))

    def to_hf(self) -> dict:
        return {
            "architectures": [SUPPORTED_ARCHITECTURES[self.architecture]],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            **({"sliding_window": self.sliding_window} if self.architecture == "mistral" else {}),
        }

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _first(value):
    return value[0] if isinstance(value, list) else value


PRESETS: dict[str, ModelConfig] = {
    "llama2-7b": ModelConfig(),
    "llama2-13b": ModelConfig(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40),
    "llama2-70b": ModelConfig(hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64, num_kv_heads=8),
    "mistral-7b": ModelConfig(intermediate_size=14336, num_kv_heads=8, sliding_window=4096,
                              max_position_embeddings=32768, architecture="mistral"),
    "smollm2-135m": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                                num_kv_heads=3, rope_theta=100000.0, max_position_embeddings=8192,
                                tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2),
}
