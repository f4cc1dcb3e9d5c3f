"""Rotary position embedding, rotate-half convention (Hugging Face LLaMA/Mistral layout)."""
import torch


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(q, k, cos, sin):
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, D]
    q_rot = (q * cos + rotate_half(q) * sin).to(q.dtype)
    k_rot = (k * cos + rotate_half(k) * sin).to(k.dtype)
    return q_rot, k_rot


apply_rope_torch = apply_rope_reference
