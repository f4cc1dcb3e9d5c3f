"""Dry run of a training recipe on the meta device: shapes, parameter counts, the FSDP2 plan, memory per GPU.

    python -m hippocrates.engine.dryrun --config train/configs/cpt_llama2_7b.yaml [--gpus 8] [key=value ...]

Nothing is allocated: the model is built on the meta device, LoRA is attached, and `fully_shard` is applied to every
block and the root under a fake process group of `--gpus` ranks, so the printed shard shapes are FSDP2's own.
The memory estimate assumes the GPU recipe: bf16 compute (FSDP2 `MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)`), frozen weights stored in bf16, trainable weights with fp32 master, gradient and two AdamW
states, flash attention (no T x T scores kept) and the fused linear cross-entropy (no full logits kept).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from hippocrates.engine.config import flatten, load_config
from hippocrates.models.config import PRESETS, ModelConfig
from hippocrates.models.lora import ALL_LINEAR, LoraConfig, add_lora

GIB = 1024 ** 3
MODEL_ALIASES = {"smollm2": "smollm2-135m"}  # the default model's short name in the recipes
BOOL, BF16, FP32 = 1, 2, 4


class DryRunError(ValueError):
    """A config the dry run cannot read; the message names the file and key."""


# ---------------------------------------------------------------------------------------------------------------
# config


def read_config(path: str | Path, overrides: list[str] = ()) -> dict:
    """The recipe resolved by the trainer's own reader (engine.config.load_config: the stage's defaults, the file,
    then `key=value` overrides; every key checked), as a flat dict of dotted keys plus `_source`."""
    try:
        config = load_config(None, path, overrides)
    except ValueError as err:  # ConfigError: one line naming the key and file
        raise DryRunError(str(err)) from None
    return {**flatten(config.to_dict()), "_source": str(path)}


def model_config(config: dict) -> ModelConfig:
    """`model` is a preset name (models.config.PRESETS), a HF checkpoint dir or its config.json."""
    source = config.get("_source", "config")
    name = config.get("model")
    if name is None:
        raise DryRunError(f"{source}: missing key 'model'")
    name = MODEL_ALIASES.get(str(name), str(name))
    if name in PRESETS:
        return PRESETS[name]
    path = Path(str(name))
    path = path / "config.json" if path.is_dir() else path
    if path.name == "config.json" and path.is_file():
        return ModelConfig.from_file(path)
    raise DryRunError(f"{source}: model={name!r} is neither a preset ({', '.join(PRESETS)}) "
                      f"nor a checkpoint dir with config.json")


def lora_config(config: dict) -> LoraConfig | None:
    defaults = LoraConfig()
    rank = int(config.get("lora.rank", defaults.rank))
    if rank == 0:
        return None
    return LoraConfig(rank=rank, alpha=float(config.get("lora.alpha", defaults.alpha)),
                      dropout=float(config.get("lora.dropout", 0.0)),
                      target_modules=list(config.get("lora.target_modules", ALL_LINEAR)))


def stage_of(config: dict) -> str:
    stage = config.get("stage")
    if stage is None:
        name = Path(config.get("_source", "")).name.lower()
        stage = next((s for s in ("dpo", "sft", "cpt") if s in name), "cpt")
    if stage not in ("cpt", "sft", "dpo"):
        raise DryRunError(f"{config.get('_source', 'config')}: stage={stage!r}: expected cpt, sft or dpo")
    return stage


def int_key(config: dict, key: str, default: int) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or value < 1:
        raise DryRunError(f"{config.get('_source', 'config')}: {key}={value!r}: expected a positive integer")
    return value


# ---------------------------------------------------------------------------------------------------------------
# the model on the meta device


def meta_model(config: dict):
    """The recipe's model on the meta device (bf16 base, fp32 adapters), LoRA attached as in training."""
    from hippocrates.models.checkpoint import build_model
    model = build_model(model_config(config), dtype=torch.bfloat16, device="meta")
    lora = lora_config(config)
    if lora is not None:
        add_lora(model, lora, seed=0)
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return model


@dataclass
class ParamCounts:
    total: int
    trainable: int
    block: int  # one transformer block
    block_trainable: int
    root: int  # embedding, final norm, LM head: what the root's fully_shard owns
    root_trainable: int


def count_params(model) -> ParamCounts:
    def numel(params, trainable_only=False):
        return sum(p.numel() for p in params if p.requires_grad or not trainable_only)

    blocks = list(model.model.layers)
    block_params = [p for b in blocks for p in b.parameters()]
    all_params = list(model.parameters())
    block_ids = {id(p) for p in block_params}
    root_params = [p for p in all_params if id(p) not in block_ids]
    return ParamCounts(total=numel(all_params), trainable=numel(all_params, True),
                       block=numel(blocks[0].parameters()), block_trainable=numel(blocks[0].parameters(), True),
                       root=numel(root_params), root_trainable=numel(root_params, True))


def activation_bytes_per_token(cfg: ModelConfig, lora: LoraConfig | None, compute_bytes: int = BF16) -> int:
    """Bytes one block saves for its backward, per token, with activations of `compute_bytes` (bf16 on GPU, fp32
    on CPU); statistics (rstd, log-sum-exp) are fp32, dropout masks bool.

    RMSNorm keeps its input and rstd; flash attention keeps q, k, v (after RoPE), its output and the log-sum-exp;
    o_proj keeps its own (transposed, contiguous) input; the MLP keeps gate and up; each LoRA layer keeps x A^T, and
    with dropout > 0 its dropped-out input and the dropout mask (one byte per input element). The norm outputs and
    the SwiGLU output, which the projections after them would keep, are rebuilt in the backward (kernels/rebuild.py).
    """
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    norms = 2 * (hidden * compute_bytes + FP32)
    attention = (q_dim + 2 * kv_dim + q_dim + q_dim) * compute_bytes + cfg.num_heads * FP32
    mlp = 2 * inter * compute_bytes
    adapters = 0
    if lora is not None:
        in_features = {"q_proj": hidden, "k_proj": hidden, "v_proj": hidden, "o_proj": q_dim,
                       "gate_proj": hidden, "up_proj": hidden, "down_proj": inter}
        for target in lora.target_modules:
            adapters += lora.rank * compute_bytes
            if lora.dropout:
                adapters += in_features[target] * (compute_bytes + BOOL)  # dropped-out input + its mask
    return norms + attention + mlp + adapters


# ---------------------------------------------------------------------------------------------------------------
# the estimate


def estimate_memory(config: dict, world_size: int, activation_checkpointing: bool | None = None,
                    ce_chunk_rows: int = 2048, prefetch_blocks: int = 2, overhead_bytes: int = GIB,
                    device: str = "cuda", sync_every_micro_batch: bool = False) -> dict:
    """Peak bytes per rank of a training step, by component, for `world_size` ranks (FSDP2 over all of them).

    `config` is the flat recipe dict (`read_config`). `activation_checkpointing` overrides the recipe's key.
    `device="cuda"`: the GPU recipe (bf16 compute, frozen weights stored in bf16, a CUDA context); `device="cpu"`:
    everything fp32, no context. Gradient sync with `grad_accum` > 1: the trainer skips it on all but the last
    micro-batch (`set_requires_gradient_sync`), so FSDP2 keeps every trainable weight's unsharded fp32 gradient
    from the first micro-batch to the last; `sync_every_micro_batch=True` plans the other choice (reduce-scatter
    after each micro-batch: only sharded gradients persist, at grad_accum x the reduce-scatter traffic).
    Returns the components, their `total`, the parameter counts and the shapes the estimate used.
    """
    if world_size < 1:
        raise DryRunError(f"world_size={world_size}: expected >= 1")
    if device not in ("cuda", "cpu"):
        raise DryRunError(f"device={device!r}: expected cuda or cpu")
    cfg = model_config(config)
    lora = lora_config(config)
    stage = stage_of(config)
    if activation_checkpointing is None:
        activation_checkpointing = bool(config.get("activation_checkpointing", False))
    seq_len = int_key(config, "seq_len", 512)
    rows = int_key(config, "batch_size", 1) * (2 if stage == "dpo" else 1)  # DPO: chosen + rejected in one forward
    tokens = rows * seq_len
    grad_accum = int_key(config, "grad_accum", 1)
    sync_skipped = grad_accum > 1 and not sync_every_micro_batch
    low = BF16 if device == "cuda" else FP32  # compute dtype: activations, gathered weights, the frozen base
    low_name = "bf16" if device == "cuda" else "fp32"

    counts = count_params(meta_model(config))
    frozen = counts.total - counts.trainable
    per_token_block = activation_bytes_per_token(cfg, lora, low)
    block_activations = tokens * per_token_block
    if activation_checkpointing:
        # block inputs kept, one block's activations live again while its backward recomputes it
        activations = cfg.num_layers * tokens * cfg.hidden_size * low + block_activations
    else:
        activations = cfg.num_layers * block_activations
    full_finetune = lora is None
    # unsharded blocks: on GPU the one in use and the next one prefetched; on CPU (synchronous collectives) the one
    # in use, plus, with more than one rank, the flat all-gather buffer its weights were copied out of
    gathered_blocks = prefetch_blocks if device == "cuda" else (2 if world_size > 1 else 1)
    if sync_skipped:
        grads = ("grads (fp32, unsharded: sync skipped between micro-batches)", counts.trainable * FP32)
        in_flight = 0  # the blocks' unsharded gradients are the ones above
    else:
        grads = ("grads (fp32, sharded)", counts.trainable * FP32 / world_size)
        # a block's unsharded gradients live until its reduce-scatter (CPU: right after its backward)
        in_flight = (prefetch_blocks if device == "cuda" else 1) * counts.block_trainable + counts.root_trainable
    grad_bytes = BF16 + FP32 if device == "cuda" else FP32  # bf16 gradient, then its fp32 copy for the reduction

    components = {
        f"frozen params ({low_name}, sharded)": frozen * low / world_size,
        "trainable params (fp32 master, sharded)": counts.trainable * FP32 / world_size,
        grads[0]: grads[1],
        "AdamW m, v (fp32, sharded)": counts.trainable * 2 * FP32 / world_size,
        f"reference model ({low_name}, sharded)":
            counts.total * low / world_size if stage == "dpo" and full_finetune else 0,
        f"all-gathered blocks ({low_name})": gathered_blocks * counts.block * low,
        f"root params unsharded ({low_name})": counts.root * low,
        f"unsharded grads in backward ({'bf16 + fp32' if device == 'cuda' else 'fp32'})": in_flight * grad_bytes,
        "activations": activations,
        f"embedding out, final norm ({low_name})": 2 * tokens * cfg.hidden_size * low,
        "fused linear CE chunk (fp32 logits + grad)": min(ce_chunk_rows, tokens) * cfg.vocab_size * 2 * FP32
        + tokens * cfg.hidden_size * FP32,
        "CUDA context, NCCL buffers (assumed)": overhead_bytes if device == "cuda" else 0,
    }
    components = {k: int(v) for k, v in components.items()}
    return {
        "components": components,
        "total": sum(components.values()),
        "world_size": world_size,
        "activation_checkpointing": activation_checkpointing,
        "stage": stage,
        "tokens_per_micro_batch": tokens,
        "activation_bytes_per_token_per_block": per_token_block,
        "gradient_sync": "skipped until the last micro-batch" if sync_skipped else "every micro-batch",
        "device": device,
        "params": counts,
    }


# ---------------------------------------------------------------------------------------------------------------
# the FSDP2 plan, applied for real under a fake process group


def fsdp_plan(config: dict, world_size: int) -> list[tuple[str, int, int, str]]:
    """(module, params it owns, elements of rank 0's shard, shape of its largest local shard) per `fully_shard` call.

    Runs the trainer's own `engine.distributed.shard` (every block, then the root: embedding, final norm, LM head) on
    the meta model under torch's fake process group, so nothing is allocated and no peers are needed.
    """
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from hippocrates.engine.distributed import shard

    model = meta_model(config)
    owned_before = {f"model.layers.{i}": block for i, block in enumerate(model.model.layers)}
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        shard(model, torch.bfloat16, activation_checkpointing=bool(config.get("activation_checkpointing", False)))
        block_ids = {id(p) for b in model.model.layers for p in b.parameters()}
        rows = []
        for name, module in [*owned_before.items(), ("(root)", model)]:
            params = [p for p in module.parameters() if name != "(root)" or id(p) not in block_ids]
            local = [p.to_local() for p in params]
            largest = max(local, key=lambda t: t.numel())
            rows.append((name, sum(p.numel() for p in params), sum(t.numel() for t in local),
                         "x".join(map(str, largest.shape))))
        return rows
    finally:
        if started:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# printing


def table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def report(config: dict, world_size: int) -> str:
    cfg, lora = model_config(config), lora_config(config)
    off = estimate_memory(config, world_size, activation_checkpointing=False)
    on = estimate_memory(config, world_size, activation_checkpointing=True)
    counts: ParamCounts = off["params"]
    out = [f"{config['_source']}: stage={off['stage']} model={config['model']} ({cfg.num_layers} layers, hidden "
           f"{cfg.hidden_size}, heads {cfg.num_heads}/{cfg.num_kv_heads}, vocab {cfg.vocab_size}) "
           f"lora={'rank %d on %s' % (lora.rank, ','.join(lora.target_modules)) if lora else 'off (full fine-tuning)'}",
           f"micro-batch {off['tokens_per_micro_batch']} tokens per rank "
           f"(batch_size={config.get('batch_size', 1)} x seq_len={config.get('seq_len', 512)}"
           f"{' x 2 (chosen + rejected)' if off['stage'] == 'dpo' else ''}), grad_accum={config.get('grad_accum', 1)},"
           f" global batch {config.get('batch_size', 1) * world_size * config.get('grad_accum', 1)} rows",
           f"gradient sync: {off['gradient_sync']} (the trainer's set_requires_gradient_sync)", ""]
    out.append(table(["parameters", "count", "%"], [
        ["total", f"{counts.total:,}", "100.00"],
        ["trainable", f"{counts.trainable:,}", f"{100 * counts.trainable / counts.total:.2f}"],
        ["frozen", f"{counts.total - counts.trainable:,}", f"{100 * (1 - counts.trainable / counts.total):.2f}"]]))
    out.append("")
    plan = fsdp_plan(config, world_size)
    shown = plan if len(plan) <= 6 else plan[:2] + [("...",) * 4] + plan[-3:]
    out.append(f"FSDP2 plan: fully_shard on each of {len(plan) - 1} blocks, then the root; {world_size} ranks, "
               f"bf16 compute, fp32 reduce")
    out.append(table(["fully_shard(module)", "params", "rank-0 shard", "largest local shard"],
                     [[n, p if n == "..." else f"{p:,}", s if n == "..." else f"{s:,}", shape]
                      for n, p, s, shape in shown]))
    out.append("")
    ac_used = bool(config.get("activation_checkpointing", False))
    out.append(f"memory per GPU, {world_size} GPUs (GiB; the recipe has activation_checkpointing={ac_used})")
    rows = [[name, f"{off['components'][name] / GIB:.2f}", f"{on['components'][name] / GIB:.2f}"]
            for name in off["components"]]
    rows.append(["total", f"{off['total'] / GIB:.2f}", f"{on['total'] / GIB:.2f}"])
    out.append(table(["component", "no AC", "AC per block"], rows))
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a recipe YAML, e.g. train/configs/cpt_llama2_7b.yaml")
    parser.add_argument("--gpus", type=int, default=8, help="ranks to plan for (default: 8)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    try:
        config = read_config(args.config, args.overrides)
        print(report(config, args.gpus))
    except ValueError as err:  # DryRunError, CheckpointError: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
