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


def setup_kv_caches(model: nn.Module, max_batch_size: int, max_seq_len: int, dtype: Optional[torch.dtype],
                    device) -> torch.device:
    """Give each of model.layers a KVCache in its self_attn (dtype and device default to the token embedding's),
    and the model its key positions; returns the device."""
    dtype = dtype or model.embed_tokens.weight.dtype
    device = device or model.embed_tokens.weight.device
    c = model.config
    for layer in model.layers:
        layer.self_attn.kv_cache = KVCache(max_batch_size, max_seq_len, c.n_kv_heads, c.head_dim, dtype, device)
    model.register_buffer("key_pos", torch.arange(max_seq_len, device=device), persistent=False)
    model.max_batch_size, model.max_seq_len = max_batch_size, max_seq_len
    return device


def select_tokens(x: Tensor, logits_at: Optional[Tensor]) -> Tensor:
    """x [B, T, C] at the token indices logits_at [B, K] -> [B, K, C]; all of x when logits_at is None."""
    return x if logits_at is None else x.gather(1, logits_at[:, :, None].expand(-1, -1, x.shape[-1]))


def causal_mask(input_pos: Tensor, key_pos: Tensor, sliding_window: Optional[int] = None, groups: int = 1
                ) -> Tensor:
    """bool [B, 1, groups * T, S], True where key position key_pos[s] may be seen from query position
    input_pos[b, t]; repeated ``groups`` times along T for attend's stacked query heads (made once per forward,
    shared by every layer)."""
    query_pos = input_pos[:, None, :, None]
    mask = key_pos <= query_pos
    if sliding_window is not None:
        mask = mask & (key_pos > query_pos - sliding_window)
    return mask.repeat(1, 1, groups, 1)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Scaled dot-product attention with grouped KV heads: q [B, H, T, D], k/v [B, Hkv, S, D], mask from
    causal_mask(..., groups=H / Hkv) -> [B, T, H * D].

    Query head h reads KV head h // (H / Hkv). Instead of repeating K and V for every query head (a copy of the
    whole cache per layer), the G = H / Hkv query heads of a group are stacked along the sequence axis:
    q [B, Hkv, G * T, D] against k/v [B, Hkv, S, D], with the mask repeated G times along T. At decode (T = 1)
    that mask is tiny; at prefill it costs B * G * T * S bytes once per forward, about what one layer's K/V
    repeat would.
    """
    b, h, t, d = q.shape
    groups = h // k.shape[1]
    q = q.reshape(b, k.shape[1], groups * t, d)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.view(b, h, t, d).transpose(1, 2).reshape(b, t, h * d)
