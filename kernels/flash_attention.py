"""Attention with causal, sliding-window and packed-document masks, GQA without repeating K/V."""
import torch
import torch.nn.functional as F


def attention_mask(tq, tk, causal, sliding_window, segment_ids, device):
    """Boolean mask, True where a query may attend: [Tq, Tk] or [B, 1, Tq, Tk] with segment ids; None if all True."""
    if not causal and sliding_window is None and segment_ids is None:
        return None
    q_pos = torch.arange(tk - tq, tk, device=device)[:, None]  # [Tq, 1]
    k_pos = torch.arange(tk, device=device)[None, :]  # [1, Tk]
    mask = torch.ones(tq, tk, dtype=torch.bool, device=device)
    if causal:
        mask &= k_pos <= q_pos
    if sliding_window is not None:
        mask &= (q_pos - k_pos) < sliding_window
    if segment_ids is not None:
        mask = mask & (segment_ids[:, -tq:, None] == segment_ids[:, None, :])[:, None]  # [B, 1, Tq, Tk]
    return mask


def attention_reference(q, k, v, causal=True, sliding_window=None, segment_ids=None, scale=None):
    tq, tk = q.shape[-2], k.shape[-2]
    if causal and sliding_window is None and segment_ids is None and tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    mask = attention_mask(tq, tk, causal, sliding_window, segment_ids, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


attention_torch = attention_reference
