"""Llama 2/3, Mistral and Qwen2: RMSNorm, rotary positions (with Llama-3 scaling), grouped KV heads, SwiGLU.

Module names follow Hugging Face's (embed_tokens, layers.i.self_attn.o_proj, ..., norm, lm_head) without the
"model." prefix, so a checkpoint maps by name and every projection is an nn.Linear that quantize_model can swap.
Two are fused (fp6llm/fused.py): self_attn.qkv_proj holds q_proj's, k_proj's and v_proj's rows, mlp.gate_up_proj
gate_proj's and up_proj's; the loader stacks them from those names. A decode step launches ~10 kernels per layer on
CUDA (tests/test_launches.py, docs/decode-launches.md): norms and silu(gate) * up are one kernel each (decoder_ops.py),
rotary of q and k with the cache write of k and v one more (models/attention.py).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..decoder_ops import silu_mul
from ..nn import ordered_for
from .attention import (BLOCK_SIZE, KVBatch, PagedKVCache, contiguous_kv_batch, ordered_heads_for, select_tokens,
                        setup_kv_caches)
from .config import ModelConfig
from .norm import Norm
from .parallel import INPUT, OUTPUT


class Transformer(nn.Module):
    tensor_parallel = None  # the TensorParallel of this process once the model runs as one rank (parallel.py)
    # What tensor parallelism (models/parallel.py) slices in each of ``layers``, by the unfused checkpoint's names
    # (qkv_proj and gate_up_proj are sliced by these parts): the weight dimension split (OUTPUT: column-parallel,
    # INPUT: row-parallel) and the features split (query heads, KV heads, MLP hidden units).
    TENSOR_PARALLEL = {"self_attn.q_proj": (OUTPUT, "heads"), "self_attn.k_proj": (OUTPUT, "kv_heads"),
                       "self_attn.v_proj": (OUTPUT, "kv_heads"), "self_attn.o_proj": (INPUT, "heads"),
                       "mlp.gate_proj": (OUTPUT, "mlp"), "mlp.up_proj": (OUTPUT, "mlp"),
                       "mlp.down_proj": (INPUT, "mlp")}
    # The projections of each of ``layers`` that are one Linear of their parts' rows, in this order (fused.py).
    FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
             "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
    ARCH = "llama"  # a subclass (gemma3.py) names its own, and makes its own embedding and blocks

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.arch != self.ARCH:
            raise ValueError(f"{type(self).__module__.rpartition('.')[2]}.Transformer needs arch {self.ARCH!r}, "
                             f"got {config.arch!r}")
        self.config = config
        self.embed_tokens = self.embedding(config)
        self.layers = nn.ModuleList(self.block(config, layer) for layer in range(config.n_layers))
        self.norm = Norm(config.dim, config.norm_eps, rms=True)
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
        cos, sin = rope_table(self.config, max_seq_len, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def use_local_config(self, config: ModelConfig) -> None:
        """Run as one tensor-parallel rank whose projections hold its slices: ``config`` has the rank's head counts
        and intermediate_size (parallel.local_config), which its attention and KV cache take."""
        self.config = config
        for layer in self.layers:
            layer.self_attn.n_heads, layer.self_attn.n_kv_heads = config.n_heads, config.n_kv_heads

    def forward(self, tokens: Tensor, input_pos: Tensor, logits_at: Optional[Tensor] = None,
                kv: Optional[KVBatch] = None) -> Tensor:
        """tokens, input_pos: int64 [B, T] (positions < max_seq_len) -> float32 logits.

        Logits are [B, T, vocab], or [B, K, vocab] for the token indices logits_at [B, K] only (the last prompt
        token of each row, say), which spares a [B, T, vocab] tensor at prefill. kv: where the rows live in the
        paged cache; None for the contiguous layout of setup_caches (B <= max_batch_size).
        """
        if self.max_seq_len == 0:
            raise RuntimeError("call setup_caches(max_batch_size, max_seq_len) before running the model")
        x, delta = self.embed_tokens(tokens), None
        rope = self.rope_tables()
        if kv is None:
            kv = contiguous_kv_batch(input_pos, self.max_seq_len, self.block_size)
        for layer in self.layers:
            x, delta = layer(x, delta, input_pos, rope, kv)
        x, _ = self.norm(select_tokens(x, logits_at), select_tokens(delta, logits_at))
        return self.lm_head(x).float()

    def embedding(self, config: ModelConfig) -> nn.Module:
        return nn.Embedding(config.vocab_size, config.dim)

    def block(self, config: ModelConfig, layer: int) -> nn.Module:
        """Layer number ``layer`` of the decoder."""
        return Block(config)

    def rope_tables(self) -> tuple[Tensor, ...]:
        """What each layer's attention turns q and k by: (cos, sin) [max_seq_len, head_dim / 2]."""
        return self.rope_cos, self.rope_sin


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = Norm(config.dim, config.norm_eps, rms=True)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = Norm(config.dim, config.norm_eps, rms=True)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, delta: Optional[Tensor], input_pos: Tensor, rope: tuple[Tensor, Tensor],
                kv: KVBatch) -> tuple[Tensor, Tensor]:
        """The residual stream is x + delta (x alone for delta None); returns the next block's (x, delta): each
        residual add is fused into the norm after it (models/norm.py)."""
        # each norm writes its output in the wgmma kernel's k order where the FP6 layer it feeds runs that kernel
        # (nn.ordered_for): it then needs no x_order launch of its own
        order = ordered_for(self.self_attn.qkv_proj, x)
        h, x = self.input_layernorm(x, delta, order)
        delta = self.self_attn(h, input_pos, rope, kv, order)
        order = ordered_for(self.mlp.gate_up_proj, x)
        h, x = self.post_attention_layernorm(x, delta, order)
        return x, self.mlp(h, order)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        # q, k and v in one projection (fused.py): its rows are q_proj's, k_proj's, v_proj's
        self.qkv_proj = nn.Linear(config.dim, (config.n_heads + 2 * config.n_kv_heads) * config.head_dim,
                                  bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=config.o_bias)
        self.sliding_window = config.sliding_window
        self.kv_cache: Optional[PagedKVCache] = None

    def forward(self, x: Tensor, input_pos: Tensor, rope: tuple[Tensor, Tensor], kv: KVBatch,
                x_ordered: bool = False) -> Tensor:
        """x [B, T, dim] (x_ordered: in the wgmma kernel's k order, for qkv_proj); rope: the model's tables cos, sin
        [max_seq_len, head_dim / 2]; kv: the rows' cache blocks."""
        b, t, _ = x.shape
        qkv = (self.qkv_proj(x, x_ordered=True) if x_ordered else self.qkv_proj(x)).view(b, t, -1, self.head_dim)
        # q's and k's heads turn and k, v enter the cache in one launch
        q = self.kv_cache.rotate_and_write(kv.slot_mapping, qkv, self.n_heads, input_pos, *rope)
        # attention writes each head in o_proj's wgmma order where o_proj runs that kernel (heads of 128 or more)
        order = ordered_heads_for(self.o_proj, self.head_dim, x)
        attended = self.kv_cache.attend(q.transpose(1, 2), input_pos, kv, self.sliding_window, order)
        return self.o_proj(attended, x_ordered=True) if order else self.o_proj(attended)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        # gate and up in one projection (fused.py): its rows are gate_proj's, then up_proj's
        self.gate_up_proj = nn.Linear(config.dim, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.dim, bias=config.mlp_bias)

    def forward(self, x: Tensor, x_ordered: bool = False) -> Tensor:
        """x [..., dim] (x_ordered: in the wgmma kernel's k order, for gate_up_proj)."""
        gate_up = self.gate_up_proj(x, x_ordered=True) if x_ordered else self.gate_up_proj(x)
        if ordered_for(self.down_proj, gate_up):  # silu(gate) * up in one kernel, in down_proj's order if it takes it
            return self.down_proj(silu_mul(gate_up, order=True), x_ordered=True)
        return self.down_proj(silu_mul(gate_up))


def rope_table(config: ModelConfig, positions: int, device=None) -> tuple[Tensor, Tensor]:
    """cos, sin float32 [positions, head_dim / 2] of the angles p * rope_frequencies(config) for p < positions."""
    angles = torch.outer(torch.arange(positions, device=device, dtype=torch.float32), rope_frequencies(config, device))
    return angles.cos(), angles.sin()


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
