"""Llama 2/3, Mistral and Qwen2: RMSNorm, rotary positions (with Llama-3 scaling), grouped KV heads, SwiGLU.

Module names follow Hugging Face's (embed_tokens, layers.i.self_attn.q_proj, ..., norm, lm_head) without the
"model." prefix, so a checkpoint maps by name and every projection is an nn.Linear that quantize_model can swap.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import BLOCK_SIZE, KVBatch, PagedKVCache, contiguous_kv_batch, select_tokens, setup_kv_caches
from .config import ModelConfig


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.arch != "llama":
            raise ValueError(f"llama.Transformer needs arch 'llama', got {config.arch!r}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.max_batch_size = self.max_seq_len = 0

    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype: Optional[torch.dtype] = None,
                     device=None, num_blocks: Optional[int] = None, block_size: int = BLOCK_SIZE) -> None:
        """Allocate each layer's paged KV cache (models/attention.py; num_blocks defaults to max_batch_size rows of
        max_seq_len positions) and the RoPE table of max_seq_len positions.

        dtype and device default to the token embedding's.
        """
        device = setup_kv_caches(self, max_batch_size, max_seq_len, dtype, device, num_blocks, block_size)
        angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32),
                             rope_frequencies(self.config, device))
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)

    def forward(self, tokens: Tensor, input_pos: Tensor, logits_at: Optional[Tensor] = None,
                kv: Optional[KVBatch] = None) -> Tensor:
        """tokens, input_pos: int64 [B, T] (positions < max_seq_len) -> float32 logits.

        Logits are [B, T, vocab], or [B, K, vocab] for the token indices logits_at [B, K] only (the last prompt
        token of each row, say), which spares a [B, T, vocab] tensor at prefill. kv: where the rows live in the
        paged cache; None for the contiguous layout of setup_caches (B <= max_batch_size).
        """
        if self.max_seq_len == 0:
            raise RuntimeError("call setup_caches(max_batch_size, max_seq_len) before running the model")
        x = self.embed_tokens(tokens)
        rope = (self.rope_cos[input_pos][:, :, None].to(x.dtype), self.rope_sin[input_pos][:, :, None].to(x.dtype))
        if kv is None:
            kv = contiguous_kv_batch(input_pos, self.max_seq_len, self.block_size)
        for layer in self.layers:
            x = layer(x, input_pos, rope, kv)
        return self.lm_head(self.norm(select_tokens(x, logits_at))).float()


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, input_pos: Tensor, rope: tuple[Tensor, Tensor], kv: KVBatch) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), input_pos, rope, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=config.o_bias)
        self.sliding_window = config.sliding_window
        self.kv_cache: Optional[PagedKVCache] = None

    def forward(self, x: Tensor, input_pos: Tensor, rope: tuple[Tensor, Tensor], kv: KVBatch) -> Tensor:
        b, t, _ = x.shape
        q = apply_rope(self.q_proj(x).view(b, t, self.n_heads, self.head_dim), *rope)
        k = apply_rope(self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim), *rope)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        self.kv_cache.write(kv.slot_mapping, k, v)
        return self.o_proj(self.kv_cache.attend(q.transpose(1, 2), input_pos, kv, self.sliding_window))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.dim, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.dim, bias=config.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, T, H, D] by its positions' angles (cos, sin [B, T, 1, D/2]), halves layout (HF checkpoints):
    the pair (x[i], x[i + D/2]) turns by the angle of frequency i."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_frequencies(config: ModelConfig, device=None) -> Tensor:
    """float32 [head_dim / 2]: theta^(-2i / head_dim), rescaled as config.rope_scaling says.

    "linear" divides every frequency by the factor. "llama3" (Llama 3.1) divides only the low frequencies (long
    wavelengths, beyond original_max_position_embeddings / low_freq_factor) and blends smoothly into the high ones
    (shorter than original_max_position_embeddings / high_freq_factor), which are left alone.
    """
    dim = config.head_dim
    freqs = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.int64).float() / dim)
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        return freqs / scaling["factor"]
    if rope_type != "llama3":
        return freqs
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freqs
    smooth = ((old_context / wavelen - low) / (high - low)).clamp(0, 1)
    return (1 - smooth) * freqs / factor + smooth * freqs
