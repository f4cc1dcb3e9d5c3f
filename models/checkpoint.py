"""Checkpoints in and out: Hugging Face safetensors (sharded or single file, read tensor by tensor) and GGUF in.

A parameter may hold only some rows of its tensor (an FSDP2 shard): `load_safetensors_into` reads just those rows
from the file, so a sharded model is filled without a full copy anywhere.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import gguf
from .config import CheckpointError, ModelConfig
from .transformer import Linear, Transformer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
IGNORED_KEYS = ("rotary_emb.inv_freq",)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


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
        return model_from_gguf(gguf.open_gguf(path), dtype, device, source=str(path))
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


def whole_rows(name: str, param: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    """Rows [0, len) of a plain parameter, copied into the parameter itself."""
    return 0, param.shape[0], param.data


@torch.no_grad()
def load_safetensors_into(model: Transformer, files: list[Path], rows_of=whole_rows):
    """Copy each checkpoint tensor into its parameter, converting dtype and device one tensor at a time.

    `rows_of(name, param) -> (start, stop, local)`: the rows [start, stop) of dim 0 that `param` holds and the tensor
    they go into (an FSDP2 shard's local tensor). Only those bytes are read, with plain file reads straight into
    `local` (through one buffer of the slice when the dtype or device differs): no file pages are mapped, so a
    rank's memory grows by its shards alone.
    """
    targets = dict(model.state_dict(keep_vars=True))
    tied = model.config.tie_word_embeddings
    loaded = set()
    for file in files:
        if not file.exists():
            raise CheckpointError(f"{file}: shard listed in the index is missing")
        try:
            with safe_open(str(file), framework="pt", device="cpu") as reader:  # safetensors checks the file
                keys = list(reader.keys())
            entries, data_start = safetensors_header(file)
            with open(file, "rb", buffering=0) as handle:
                for key in keys:
                    if key.endswith(IGNORED_KEYS) or (tied and key == "lm_head.weight"):
                        continue
                    if key not in targets:
                        raise CheckpointError(f"{file}: unexpected tensor {key!r} for this architecture")
                    entry = entries[key]
                    if tuple(entry["shape"]) != tuple(targets[key].shape):
                        raise CheckpointError(f"{file}: tensor {key!r} has shape {tuple(entry['shape'])}, "
                                              f"the config expects {tuple(targets[key].shape)}")
                    start, stop, local = rows_of(key, targets[key])
                    read_rows(handle, entry, data_start, start, stop, local)
                    loaded.add(key)
        except CheckpointError:
            raise
        except Exception as err:  # safetensors raises its own error types for truncated / corrupt files
            raise CheckpointError(f"{file}: cannot read safetensors ({type(err).__name__}: {err})") from None
    check_complete(targets, loaded, str(files[0].parent))


def safetensors_header(file: Path) -> tuple[dict, int]:
    """{name: {"dtype", "shape", "data_offsets": [begin, end]}} of a safetensors file, and where its data begins
    (the format: an 8-byte little-endian header length, the JSON header, then the tensors' bytes)."""
    with open(file, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def read_rows(handle, entry: dict, data_start: int, start: int, stop: int, out: torch.Tensor):
    """Rows [start, stop) of dim 0 of one row-major tensor (contiguous bytes in the file) into `out`."""
    dtype = SAFETENSORS_DTYPES[entry["dtype"]]
    shape = entry["shape"]
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    direct = out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous()
    buffer = out if direct else torch.empty((stop - start, *shape[1:]), dtype=dtype)
    view = memoryview(buffer.view(-1).view(torch.uint8).numpy())  # [rows * row_bytes]
    handle.seek(data_start + entry["data_offsets"][0] + start * row_bytes)
    if handle.readinto(view) != len(view):
        raise CheckpointError(f"{handle.name}: truncated inside tensor data")
    if not direct:
        out.copy_(buffer)


def check_complete(targets: dict, loaded: set, source: str):
    """Every weight was loaded (LoRA adapters are initialized, never loaded)."""
    missing = [k for k in targets if k not in loaded and "lora_" not in k]
    if missing:
        raise CheckpointError(f"{source}: tensor {missing[0]!r} missing from the checkpoint "
                              f"({len(missing)} missing in all)")


@torch.no_grad()
def model_from_gguf(reader, dtype=torch.float32, device="cpu", source: str = "gguf") -> Transformer:
    """The Transformer a llama-architecture GGUF describes, dequantized to `dtype`."""
    config = gguf.config_from_gguf(reader, source)
    model = build_model(config, dtype, device)
    targets = dict(model.state_dict(keep_vars=True))
    loaded = set()
    for name, value in gguf.weights(reader, config, source):
        if name not in targets:
            raise CheckpointError(f"{source}: tensor {name!r} does not fit this config")
        if tuple(value.shape) != tuple(targets[name].shape):
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(value.shape)}, "
                                  f"the config expects {tuple(targets[name].shape)}")
        targets[name].data.copy_(value)
        loaded.add(name)
    check_complete(targets, loaded, source)
    return model.eval()


def export_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """HF-named tensors with any LoRA adapters merged into their base weights; tied head left out."""
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
