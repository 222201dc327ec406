"""What the decoders share: a static per-row KV cache, the causal mask from per-row positions, and GQA attention.

Positions are per row (input_pos [B, T]), so one batch can hold prompts of different lengths (right-padded) and
sequences at different decode steps (continuous batching). Row b's token t is written at cache position
input_pos[b, t] and attends to every cache position <= input_pos[b, t]; whatever lies beyond (a previous
sequence's keys, the junk of right padding) is masked until it is overwritten.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KVCache(nn.Module):
    """Keys and values [max_batch_size, n_kv_heads, max_seq_len, head_dim] of one layer."""

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device=None):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, H, T, D] at each row's positions input_pos [B, T]; return the caches of rows 0..B-1."""
        index = input_pos[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        k_all, v_all = self.k_cache[: k.shape[0]], self.v_cache[: k.shape[0]]
        k_all.scatter_(2, index, k.to(k_all.dtype))
        v_all.scatter_(2, index, v.to(v_all.dtype))
        return k_all, v_all


def causal_mask(input_pos: Tensor, key_pos: Tensor, sliding_window: Optional[int] = None) -> Tensor:
    """bool [B, 1, T, S], True where key position key_pos[s] may be seen from query position input_pos[b, t]."""
    query_pos = input_pos[:, None, :, None]
    mask = key_pos <= query_pos
    if sliding_window is not None:
        mask = mask & (key_pos > query_pos - sliding_window)
    return mask


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Scaled dot-product attention with grouped KV heads: q [B, H, T, D], k/v [B, Hkv, S, D] -> [B, T, H * D].

    Query head h reads KV head h // (H / Hkv). Instead of repeating K and V for every query head (a copy of the
    whole cache per layer), the G = H / Hkv query heads of a group are stacked along the sequence axis:
    q [B, Hkv, G * T, D] against k/v [B, Hkv, S, D], with the mask repeated G times along T.
    """
    b, h, t, d = q.shape
    groups = h // k.shape[1]
    q = q.reshape(b, k.shape[1], groups * t, d)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.repeat(1, 1, groups, 1))
    return out.view(b, h, t, d).transpose(1, 2).reshape(b, t, h * d)
