"""Hugging Face safetensors checkpoints in and out: memory-mapped, tensor by tensor, sharded or single file."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import CheckpointError, ModelConfig
from .transformer import Transformer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
IGNORED_KEYS = ("rotary_emb.inv_freq",)


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint dir, or a training run's out_dir (its `final/`)."""
    path = Path(path)
    if path.is_dir() and not (path / "config.json").exists() and (path / "final" / "config.json").exists():
        return path / "final"
    return path


def build_model(config: ModelConfig, dtype=torch.float32, device="cpu") -> Transformer:
    """Construct on the meta device, then allocate uninitialized storage of `dtype` on `device` (no fp32 detour)."""
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to(dtype)
    if str(device) != "meta":
        model = model.to_empty(device=device)
    return model


def load_model(path: str | Path, dtype=torch.float32, device="cpu") -> Transformer:
    """Load a HF checkpoint dir (single or sharded safetensors), a training out_dir, or a `.gguf` file."""
    path = Path(path)
    if path.suffix == ".gguf":
        from .gguf import load_gguf_model
        return load_gguf_model(path, dtype=dtype, device=device)
    path = resolve_checkpoint_dir(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    config = ModelConfig.from_file(path / "config.json")
    model = build_model(config, dtype, device)
    load_safetensors_into(model, safetensors_files(path))
    return model.eval()


def safetensors_files(ckpt_dir: Path) -> list[Path]:
    index = ckpt_dir / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: not a safetensors index ({err})") from None
        return [ckpt_dir / name for name in sorted(set(weight_map.values()))]
    single = ckpt_dir / SINGLE_FILE
    if single.exists():
        return [single]
    raise CheckpointError(f"{ckpt_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


@torch.no_grad()
def load_safetensors_into(model: Transformer, files: list[Path]):
    """Copy each tensor straight into the model's parameter (converting dtype/device one tensor at a time)."""
    targets = dict(model.state_dict(keep_vars=True))
    tied = model.config.tie_word_embeddings
    loaded = set()
    for file in files:
        if not file.exists():
            raise CheckpointError(f"{file}: shard listed in the index is missing")
        try:
            with safe_open(str(file), framework="pt", device="cpu") as reader:
                for key in reader.keys():
                    if key.endswith(IGNORED_KEYS) or (tied and key == "lm_head.weight"):
                        continue
                    if key not in targets:
                        raise CheckpointError(f"{file}: unexpected tensor {key!r} for this architecture")
                    slice_ = reader.get_slice(key)
                    shape = tuple(slice_.get_shape())
                    if shape != tuple(targets[key].shape):
                        raise CheckpointError(
                            f"{file}: tensor {key!r} has shape {shape}, the config expects {tuple(targets[key].shape)}")
                    targets[key].data.copy_(reader.get_tensor(key))
                    loaded.add(key)
        except CheckpointError:
            raise
        except Exception as err:  # safetensors raises its own error types for truncated / corrupt files
            raise CheckpointError(f"{file}: cannot read safetensors ({type(err).__name__}: {err})") from None
    missing = [k for k in targets if k not in loaded and "lora_" not in k]
    if missing:
        raise CheckpointError(f"{files[0].parent}: tensor {missing[0]!r} missing from the checkpoint "
                              f"({len(missing)} missing in all)")


def export_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """HF-named tensors with any LoRA adapters merged into their base weights; tied head left out."""
    from .transformer import Linear
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            out[f"{name}.weight"] = module.merged_weight()
    for name, param in model.named_parameters():
        if "lora_" not in name and name not in out:
            out[name] = param
    return {k: v.detach().contiguous() for k, v in out.items()}


def save_pretrained(model: Transformer, out_dir: str | Path, max_shard_bytes: int = 2 * 1024**3, tokenizer=None):
    """Write config.json and safetensors (sharded with an index past max_shard_bytes) that transformers loads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = export_state_dict(model)
    shards, current, size = [], {}, 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += nbytes
    shards.append(current)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        _atomic_save(shards[0], out_dir / SINGLE_FILE, metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save(shard, out_dir / name, metadata)
            weight_map.update({key: name for key in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (out_dir / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2))
    hf_config = model.config.to_hf()
    hf_config["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    if tokenizer is not None:
        tokenizer.save(out_dir)
    return out_dir


def _atomic_save(tensors, path: Path, metadata):
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
