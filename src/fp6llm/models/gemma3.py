"""Gemma-3's text decoder: llama.py's model with Gemma's differences, each where it acts.

The token embedding is scaled by sqrt(dim) (rounded to the embedding's dtype, as transformers does); every RMSNorm
scales by (1 + weight); a layer has four norms (before and after attention, before and after the MLP), and
q and k get an RMSNorm per head before RoPE; the query is scaled by query_pre_attn_scalar ** -0.5; the MLP is
GeGLU (gelu_tanh(gate) * up); the layers of config.layer_types "sliding_attention" see only the last
sliding_window keys and turn by local_rope_theta (unscaled), the "full_attention" ones see all and turn by
rope_theta (and rope_scaling); the logits may be soft-capped (tanh). Module names are Hugging Face's, projections
fused as llama's (TENSOR_PARALLEL and FUSED are llama.Transformer's: q_norm and k_norm act per head, so every
rank keeps them whole).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..decoder_ops import add_norm, rotary
from ..quantize import FLOAT_DTYPES
from . import llama
from .attention import KVBatch
from .config import ModelConfig
from .llama import rope_table
from .norm import Norm


class Transformer(llama.Transformer):
    ARCH = "gemma3"

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.norm = GemmaNorm(config.dim, config.norm_eps)

    def embedding(self, config: ModelConfig) -> nn.Module:
        return ScaledEmbedding(config.vocab_size, config.dim)

    def block(self, config: ModelConfig, layer: int) -> nn.Module:
        return Block(config, sliding=config.layer_types[layer] == "sliding_attention")

    def setup_caches(self, *args, **kwargs) -> None:
        """llama.Transformer.setup_caches, and the sliding layers' RoPE table (local_rope_theta, no scaling)."""
        super().setup_caches(*args, **kwargs)
        c = self.config
        local = dataclasses.replace(c, rope_theta=c.local_rope_theta or c.rope_theta, rope_scaling=None)
        cos, sin = rope_table(local, self.max_seq_len, self.rope_cos.device)
        self.register_buffer("local_rope_cos", cos, persistent=False)
        self.register_buffer("local_rope_sin", sin, persistent=False)

    def rope_tables(self) -> tuple[Tensor, ...]:
        """(cos, sin) of the global layers, then (cos, sin) of the sliding ones."""
        return self.rope_cos, self.rope_sin, self.local_rope_cos, self.local_rope_sin

    def forward(self, tokens: Tensor, input_pos: Tensor, logits_at: Optional[Tensor] = None,
                kv: Optional[KVBatch] = None) -> Tensor:
        """llama.Transformer.forward's logits, soft-capped to (-cap, cap) by cap * tanh(logits / cap) when the
        config has final_logit_softcapping."""
        logits = super().forward(tokens, input_pos, logits_at, kv)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap


class ScaledEmbedding(nn.Embedding):
    """Token embeddings times sqrt(embedding_dim), the factor rounded to the table's dtype first (transformers'
    Gemma3TextScaledWordEmbedding), so that float16 runs scale by the same number. The rounded factors are Python
    floats made once (on the CPU, whatever device builds the module): no tensor is made per forward, which
    torch.compile and CUDA graph capture would have to trace."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__(num_embeddings, embedding_dim)
        scale = math.sqrt(embedding_dim)
        self.scales = {dtype: float(torch.tensor(scale, dtype=dtype, device="cpu")) for dtype in FLOAT_DTYPES}

    def forward(self, tokens: Tensor) -> Tensor:
        return super().forward(tokens) * self.scales[self.weight.dtype]


class GemmaNorm(Norm):
    """RMSNorm scaling by (1 + weight): Gemma stores the offset from 1 (its weights start at zero). The sum
    1 + weight is made in float32, as transformers does."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps, rms=True)

    def forward(self, x: Tensor, delta: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        return add_norm(x, delta, 1.0 + self.weight.float(), None, self.eps, True)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, sliding: bool):
        super().__init__()
        self.input_layernorm = GemmaNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config, sliding)
        self.post_attention_layernorm = GemmaNorm(config.dim, config.norm_eps)
        self.pre_feedforward_layernorm = GemmaNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)
        self.post_feedforward_layernorm = GemmaNorm(config.dim, config.norm_eps)

    def forward(self, x: Tensor, delta: Optional[Tensor], input_pos: Tensor, rope: tuple[Tensor, ...],
                kv: KVBatch) -> tuple[Tensor, Tensor]:
        """As llama.Block's (x, delta) residual stream; the outputs of attention and MLP are normed before the add,
        which the next norm fuses."""
        h, x = self.input_layernorm(x, delta)
        attended, _ = self.post_attention_layernorm(self.self_attn(h, input_pos, rope, kv))
        h, x = self.pre_feedforward_layernorm(x, attended)
        out, _ = self.post_feedforward_layernorm(self.mlp(h))
        return x, out


class Attention(llama.Attention):
    def __init__(self, config: ModelConfig, sliding: bool):
        super().__init__(config)
        self.q_norm = GemmaNorm(config.head_dim, config.norm_eps)
        self.k_norm = GemmaNorm(config.head_dim, config.norm_eps)
        self.sliding = sliding
        self.sliding_window = config.sliding_window if sliding else None
        # the attention divides q.k by sqrt(head_dim); Gemma divides by sqrt(query_pre_attn_scalar)
        self.query_scale = math.sqrt(config.head_dim / (config.query_pre_attn_scalar or config.head_dim))

    def forward(self, x: Tensor, input_pos: Tensor, rope: tuple[Tensor, ...], kv: KVBatch) -> Tensor:
        """x [B, T, dim]; rope: the model's rope_tables (global cos, sin, then local cos, sin)."""
        b, t, _ = x.shape
        q, k, v = self.qkv_proj(x).view(b, t, -1, self.head_dim).split(
            [self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=2)
        cos, sin = rope[2:] if self.sliding else rope[:2]
        q = rotary(self.q_norm(q)[0], input_pos, cos, sin)
        k = rotary(self.k_norm(k)[0], input_pos, cos, sin)
        if self.query_scale != 1.0:
            q = q * self.query_scale
        self.kv_cache.write(kv.slot_mapping, k, v)
        return self.o_proj(self.kv_cache.attend(q.transpose(1, 2), input_pos, kv, self.sliding_window))


class MLP(llama.MLP):
    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)
