"""LLaMA-2 / Mistral decoder in plain PyTorch. Module names mirror Hugging Face, so state dicts load without renaming.

Transformer
  model.embed_tokens                          [vocab, hidden]
  model.layers[i]: input_layernorm -> self_attn(q,k,v,o; RoPE, GQA, sliding window) -> residual
                   post_attention_layernorm -> mlp(gate, up, down; SwiGLU) -> residual
  model.norm
  lm_head                                     [vocab, hidden], absent when tied to the embedding
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hippocrates.kernels import ops
from .config import ModelConfig
from hippocrates.kernels.rebuild import rebuild_in_backward, rebuild_scope, scratch_output


class Linear(nn.Module):
    """A bias-free linear layer that can carry a LoRA adapter: y = x W^T + scale * dropout(x) A^T B^T."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.lora_a: nn.Parameter | None = None  # [rank, in]
        self.lora_b: nn.Parameter | None = None  # [out, rank]
        self.lora_scale = 0.0
        self.lora_dropout = 0.0
        self.lora_enabled = True

    @property
    def fused_adapter(self) -> bool:
        """An active adapter without dropout: the fused LoRA ops (kernels/ops.py) compute it."""
        return self.lora_a is not None and self.lora_enabled and not (self.lora_dropout and self.training)

    def forward(self, x):
        if self.fused_adapter:
            return ops.lora_linear(x, self.weight, self.lora_a, self.lora_b, self.lora_scale)
        if self.lora_a is None or not self.lora_enabled:
            return F.linear(x, self.weight)
        dropped = F.dropout(x, self.lora_dropout, training=True)
        return F.linear(x, self.weight) + self.lora_scale * F.linear(F.linear(dropped, self.lora_a), self.lora_b)

    def merged_weight(self) -> torch.Tensor:
        """W + scale * B A, the weight a merged export holds."""
        if self.lora_a is None:
            return self.weight
        delta = (self.lora_b.float() @ self.lora_a.float()) * self.lora_scale
        return (self.weight.float() + delta).to(self.weight.dtype)

    def extra_repr(self):
        rank = 0 if self.lora_a is None else self.lora_a.shape[0]
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, lora_rank={rank}"


def project(x, *linears: Linear) -> tuple:
    """x through Linears that share it (q/k/v, gate/up): one op with the adapters' A factors stacked when every
    one carries an active adapter without dropout (kernels/lora.py), else each Linear on its own."""
    if all(m.fused_adapter for m in linears):
        return ops.lora_linears(x, [(m.weight, m.lora_a, m.lora_b) for m in linears], [m.lora_scale for m in linears])
    return tuple(m(x) for m in linears)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        """x [..., dim] -> normalized [..., dim]; rebuilt from x in the backward when the next op saves it."""
        out = scratch_output("rms_norm", x.shape, x.dtype, x.device)  # None unless rebuilt (CPU)
        return rebuild_in_backward(ops.rms_norm(x, self.weight, self.eps, out=out), ops.rms_norm, x, self.weight,
                                   self.eps)


class KVCache:
    """Preallocated keys and values of every layer: [layers, B, Hkv, max_len, D]. `length` tokens are filled."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device="cpu"):
        shape = (config.num_layers, batch_size, config.num_kv_heads, max_len, config.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k, v):
        """Write k/v [B, Hkv, T, D] after the filled part; return all keys and values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, {end} requested")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def repeat_batch(self, n: int, max_len: int | None = None) -> "KVCache":
        """A new cache whose n rows each start with this (batch-1) cache's content; room for max_len positions."""
        if self.k.shape[1] != 1:
            raise ValueError("repeat_batch needs a cache of batch size 1")
        max_len = max_len or self.max_len
        new = KVCache.__new__(KVCache)
        layers, _, heads, _, dim = self.k.shape
        new.k = self.k.new_empty(layers, n, heads, max_len, dim)
        new.v = self.v.new_empty(layers, n, heads, max_len, dim)
        new.k[:, :, :, :self.length] = self.k[:, :, :, :self.length]
        new.v[:, :, :, :self.length] = self.v[:, :, :, :self.length]
        new.length = self.length
        return new


def rope_cos_sin(position_ids, head_dim: int, theta: float, dtype):
    """position_ids [B, T] -> cos, sin [B, T, head_dim] (frequencies repeated for the rotate-half halves)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # [B, T, D/2]
    angles = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def positions_from_segments(segment_ids):
    """segment_ids [B, T] (documents packed in a row) -> position ids [B, T] restarting at 0 in each document."""
    _, t = segment_ids.shape
    index = torch.arange(t, device=segment_ids.device).expand_as(segment_ids)
    is_start = torch.ones_like(segment_ids, dtype=torch.bool)
    is_start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start_index = torch.where(is_start, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_index


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.sliding_window = config.sliding_window
        self.q_proj = Linear(config.hidden_size, config.num_heads * config.head_dim)
        self.k_proj = Linear(config.hidden_size, config.num_kv_heads * config.head_dim)
        self.v_proj = Linear(config.hidden_size, config.num_kv_heads * config.head_dim)
        self.o_proj = Linear(config.num_heads * config.head_dim, config.hidden_size)

    def forward(self, x, cos, sin, segment_ids=None, kv_cache: KVCache | None = None, layer_idx: int = 0):
        b, t, _ = x.shape
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # [B, Hq, T, D]
        k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        q, k = ops.apply_rope(q, k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v)  # [B, Hkv, T_past + T, D]
        y = ops.attention(q, k, v, causal=True, sliding_window=self.sliding_window, segment_ids=segment_ids)
        y = y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)  # [B, T, Hq * D]
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        gate, up = project(x, self.gate_proj, self.up_proj)  # [B, T, intermediate]
        out = scratch_output("swiglu", gate.shape, gate.dtype, gate.device)  # None unless rebuilt (CPU)
        hidden = ops.swiglu(gate, up, out=out, rebuild=True)  # rebuilt in the backward: down_proj keeps no copy
        return self.down_proj(hidden)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.rebuild_activations = True  # kernels/rebuild.py; off under activation checkpointing

    def forward(self, x, cos, sin, segment_ids=None, kv_cache=None):
        with rebuild_scope(self.rebuild_activations):
            # Residuals added into the projections' fresh outputs (no autograd node saves them): one buffer less.
            x = self.self_attn(self.input_layernorm(x), cos, sin, segment_ids, kv_cache, self.layer_idx).add_(x)
            return self.mlp(self.post_attention_layernorm(x)).add_(x)


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids, *, position_ids=None, segment_ids=None, kv_cache: KVCache | None = None,
                return_hidden: bool = False):
        """input_ids [B, T] -> logits [B, T, vocab] (or the final-norm hidden states [B, T, hidden]).

        segment_ids [B, T]: packed documents, attention stays within each and positions restart per document.
        kv_cache: keys/values of earlier positions; this call appends T positions to it.
        """
        b, t = input_ids.shape
        if position_ids is None:
            if segment_ids is not None:
                position_ids = positions_from_segments(segment_ids)
            else:
                start = kv_cache.length if kv_cache is not None else 0
                position_ids = torch.arange(start, start + t, device=input_ids.device).expand(b, t)
        x = self.model.embed_tokens(input_ids)  # [B, T, hidden]
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        for block in self.model.layers:
            x = block(x, cos, sin, segment_ids, kv_cache)
        if kv_cache is not None:
            kv_cache.length += t
        hidden = self.model.norm(x)  # [B, T, hidden]
        if return_hidden:
            return hidden
        return F.linear(hidden, self.output_weight)  # [B, T, vocab]

    def linear_layers(self):
        """(name, Linear) for every Linear (the places LoRA can go)."""
        return [(name, m) for name, m in self.named_modules() if isinstance(m, Linear)]

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None):
        """Random init for from-scratch models and tests: normal(0, std) matrices, unit norms."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.fill_(1.0)
            elif "lora_b" in name:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32) * std)
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
