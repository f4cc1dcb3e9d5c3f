"""torch.distributed setup and the FSDP2 wrapping of a model; the model itself knows nothing of either.

Under torchrun the process group comes from the environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT or a rendezvous
endpoint, across machines too). A plain `python train/cpt.py` gets a one-rank group in memory, so the same code
path (torch.distributed.checkpoint, the collectives) runs in both. FSDP2 wraps the model unless the run is one
process computing in fp32: it would have nothing to shard and nothing to cast (`needs_fsdp`).

Loading: every rank builds the model on the meta device and shards it there, then reads from the safetensors only
the rows of its own shards, straight into them: no rank holds a full copy and nothing is broadcast. A .gguf is
converted to safetensors once (cached) by rank 0, since GGUF's quantized blocks cannot be read by rows.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from hippocrates.models import ModelConfig, Transformer, build_model
from hippocrates.models.checkpoint import load_safetensors_into, resolve_checkpoint_dir, safetensors_files
from hippocrates.models.lora import LoraConfig, add_lora, lora_a_init, lora_layers


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(timeout_s: int = 600) -> DistEnv:
    """Join the process group: NCCL on GPU, Gloo on CPU; a one-rank group when not launched by torchrun."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        local_rank, device, backend = int(os.environ.get("LOCAL_RANK", 0)), torch.device("cpu"), "gloo"
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj, env: DistEnv):
    box = [obj if env.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def compute_dtype(mixed_precision: str, device: torch.device) -> torch.dtype:
    if mixed_precision == "auto":
        mixed_precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float32


def load_sharded_model(path: str, env: DistEnv, lora: LoraConfig | None, seed: int, mixed_precision: str = "auto",
                       activation_checkpointing: bool = False, trainable: bool = True) -> Transformer:
    """The checkpoint at `path` (HF dir or .gguf), with LoRA adapters when `lora` is given, sharded with FSDP2
    (when `needs_fsdp`).

    Trainable weights (the adapters, or every weight for full fine-tuning) are fp32 masters; on GPU with bf16
    compute the frozen base is stored in bf16. `trainable=False` freezes everything (DPO's reference copy).
    Each rank reads only its own rows of each tensor; the adapters are initialized as `add_lora(seed=seed)` does.
    """
    dtype = compute_dtype(mixed_precision, env.device)
    frozen_base = lora is not None or not trainable
    storage_dtype = dtype if frozen_base else torch.float32
    ckpt_dir = safetensors_dir(path, env)
    config = ModelConfig.from_file(ckpt_dir / "config.json")

    model = build_model(config, dtype=storage_dtype, device="meta")
    if lora is not None:
        add_lora(model, lora)
        _adapters_to_fp32(model)
    if not trainable:
        model.requires_grad_(False)
    if needs_fsdp(env.world_size, dtype):
        shard(model, dtype, activation_checkpointing)
    elif activation_checkpointing:
        checkpoint_blocks(model)
    model.to_empty(device=env.device)
    load_safetensors_into(model, safetensors_files(ckpt_dir), rows_of=local_rows)
    if lora is not None:
        init_adapters(model, seed)
    return model


def safetensors_dir(path: str, env: DistEnv):
    """The HF dir to read: `path` itself, or the safetensors that rank 0 converts a .gguf into (once, cached)."""
    if not str(path).endswith(".gguf"):
        return resolve_checkpoint_dir(path)
    converted = None
    if env.is_main:
        from hippocrates.models.fetch import converted_gguf
        converted = converted_gguf(path)
    return broadcast_object(converted, env)


def local_rows(name: str, param: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    """The rows [start, stop) of dim 0 this rank's shard of `param` holds, and its local tensor.

    FSDP2 cuts dim 0 as `torch.chunk` does: ceil(rows / world) rows per rank, the last ranks shorter or empty.
    """
    if not isinstance(param, DTensor):
        return 0, param.shape[0], param.data
    if param.placements != (Shard(0),):
        raise ValueError(f"{name}: expected a dim-0 shard, got placements {param.placements}")
    mesh = param.device_mesh
    rows, world, rank = param.shape[0], mesh.size(), mesh.get_local_rank()
    per_rank = -(-rows // world)
    start, stop = min(rank * per_rank, rows), min((rank + 1) * per_rank, rows)
    local = param.to_local()
    assert local.shape[0] == stop - start, (name, tuple(local.shape), start, stop)
    return start, stop, local


@torch.no_grad()
def init_adapters(model: Transformer, seed: int):
    """A from the seeded generator in layer order (the same values as `add_lora(model, cfg, seed=seed)`), B = 0;
    each rank draws every A (small: [rank, in]) and keeps its rows."""
    generator = torch.Generator().manual_seed(seed)
    for name, linear in lora_layers(model):
        rank, in_features = linear.lora_a.shape
        full_a = lora_a_init(rank, in_features, generator)
        start, stop, local = local_rows(f"{name}.lora_a", linear.lora_a)
        local.copy_(full_a[start:stop])
        local_rows(f"{name}.lora_b", linear.lora_b)[2].zero_()


def _adapters_to_fp32(model: Transformer):
    for _, linear in lora_layers(model):
        linear.lora_a.data = linear.lora_a.data.float()
        linear.lora_b.data = linear.lora_b.data.float()


def needs_fsdp(world_size: int, compute: torch.dtype) -> bool:
    """FSDP2 shards over ranks and casts to the compute dtype. One fp32 process needs neither: there `fully_shard`
    only copied each block's weights into an all-gather buffer and out again, in the forward and again in the
    backward (profiled on the benchmark workload: 0.1 s of copies and 0.05 s of hooks in a 9.6 s step, and 240 MB
    of peak RSS)."""
    return world_size > 1 or compute != torch.float32


def shard(model: Transformer, compute: torch.dtype, activation_checkpointing: bool = False):
    """FSDP2: one `fully_shard` per transformer block, then the root (embedding, final norm, LM head)."""
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32) \
        if compute != torch.float32 else MixedPrecisionPolicy()
    if activation_checkpointing:
        checkpoint_blocks(model)
    for block in model.model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def checkpoint_blocks(model: Transformer):
    """Activation checkpointing: each block's forward runs again in the backward instead of keeping activations."""
    from torch.distributed._composable import checkpoint
    for block in model.model.layers:
        checkpoint(block)
        block.rebuild_activations = False  # the whole block is recomputed anyway


def set_gradient_sync(model: torch.nn.Module, enabled: bool):
    """FSDP2's switch for reducing gradients after this backward; without FSDP2 (one process) the gradients add up
    in .grad either way."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)


def gather_full_state(model: Transformer) -> dict[str, torch.Tensor]:
    """Every weight gathered onto rank 0's CPU (other ranks get an empty dict). A collective: call on all ranks."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values
