"""OPT: LayerNorm (pre-LN, or post-LN for OPT-350m), learned positions (offset 2), ReLU MLP, biases everywhere.

Module names follow Hugging Face's decoder (embed_tokens, embed_positions, layers.i.self_attn.out_proj, ...,
layers.i.fc1, final_layer_norm, lm_head) without the "model.decoder." prefix; self_attn.qkv_proj holds q_proj's,
k_proj's and v_proj's rows (fp6llm/fused.py), stacked by the loader from those names.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import ordered_for
from .attention import (BLOCK_SIZE, KVBatch, PagedKVCache, contiguous_kv_batch, ordered_heads_for, select_tokens,
                        setup_kv_caches)
from .config import ModelConfig
from .norm import Norm
from .parallel import INPUT, OUTPUT

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
               "silu": F.silu}


class Transformer(nn.Module):
    tensor_parallel = None  # the TensorParallel of this process once the model runs as one rank (parallel.py)
    # What tensor parallelism (models/parallel.py) slices in each of ``layers`` (as llama.Transformer's; qkv_proj by
    # its parts); everything else, project_in / project_out included, is replicated.
    TENSOR_PARALLEL = {"self_attn.q_proj": (OUTPUT, "heads"), "self_attn.k_proj": (OUTPUT, "kv_heads"),
                       "self_attn.v_proj": (OUTPUT, "kv_heads"), "self_attn.out_proj": (INPUT, "heads"),
                       "fc1": (OUTPUT, "mlp"), "fc2": (INPUT, "mlp")}
    FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")}  # as llama's

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.arch != "opt":
            raise ValueError(f"opt.Transformer needs arch 'opt', got {config.arch!r}")
        self.config = config
        projected = config.word_embed_proj_dim != config.dim
        self.embed_tokens = nn.Embedding(config.vocab_size, config.word_embed_proj_dim)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + config.position_offset, config.dim)
        self.project_in = nn.Linear(config.word_embed_proj_dim, config.dim, bias=False) if projected else None
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.final_layer_norm = Norm(config.dim, config.norm_eps, rms=False) if config.final_layer_norm else None
        self.project_out = nn.Linear(config.dim, config.word_embed_proj_dim, bias=False) if projected else None
        self.lm_head = nn.Linear(config.word_embed_proj_dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.max_batch_size = self.max_seq_len = 0

    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype: Optional[torch.dtype] = None,
                     device=None, num_blocks: Optional[int] = None, block_size: int = BLOCK_SIZE) -> None:
        """Allocate each layer's paged KV cache (models/attention.py; num_blocks defaults to max_batch_size rows of
        max_seq_len positions); dtype and device default to the token embedding's. Raises ValueError past the
        learned position table."""
        positions = self.config.max_position_embeddings
        if max_seq_len > positions:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds OPT's {positions} learned positions")
        setup_kv_caches(self, max_batch_size, max_seq_len, dtype, device, num_blocks, block_size)

    def use_local_config(self, config: ModelConfig) -> None:
        """Run as one tensor-parallel rank whose projections hold its slices (as llama.Transformer's)."""
        self.config = config
        for layer in self.layers:
            layer.self_attn.n_heads = config.n_heads

    def forward(self, tokens: Tensor, input_pos: Tensor, logits_at: Optional[Tensor] = None,
                kv: Optional[KVBatch] = None) -> Tensor:
        """tokens, input_pos: int64 [B, T] -> float32 logits [B, T, vocab] ([B, K, vocab] with logits_at [B, K]).
        kv: where the rows live in the paged cache; None for the contiguous layout of setup_caches."""
        if self.max_seq_len == 0:
            raise RuntimeError("call setup_caches(max_batch_size, max_seq_len) before running the model")
        x = self.embed_tokens(tokens)
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(input_pos + self.config.position_offset)
        if kv is None:
            kv = contiguous_kv_batch(input_pos, self.max_seq_len, self.block_size)
        delta = None
        for layer in self.layers:
            x, delta = layer(x, delta, input_pos, kv)
        x = select_tokens(x, logits_at)
        delta = None if delta is None else select_tokens(delta, logits_at)
        if self.final_layer_norm is not None:
            x, _ = self.final_layer_norm(x, delta)
        elif delta is not None:
            x = x + delta
        if self.project_out is not None:
            x = self.project_out(x)
        return self.lm_head(x).float()


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.pre_norm = config.do_layer_norm_before
        self.activation = ACTIVATIONS[config.activation]
        self.self_attn = Attention(config)
        self.self_attn_layer_norm = Norm(config.dim, config.norm_eps, rms=False)
        self.fc1 = nn.Linear(config.dim, config.intermediate_size, bias=config.mlp_bias)
        self.fc2 = nn.Linear(config.intermediate_size, config.dim, bias=config.mlp_bias)
        self.final_layer_norm = Norm(config.dim, config.norm_eps, rms=False)

    def forward(self, x: Tensor, delta: Optional[Tensor], input_pos: Tensor, kv: KVBatch
                ) -> tuple[Tensor, Optional[Tensor]]:
        """The residual stream is x + delta (x alone for delta None); returns the next block's (x, delta).

        Pre-LN, x + f(norm(x)): each residual add is fused into the norm after it (models/norm.py). Post-LN,
        norm(x + f(x)): the add and the norm are one kernel too, and the stream is the norm's output (delta None).
        """
        if self.pre_norm:  # each norm in the wgmma order where the FP6 layer it feeds runs that kernel (llama.py)
            order = ordered_for(self.self_attn.qkv_proj, x)
            h, x = self.self_attn_layer_norm(x, delta, order)
            delta = self.self_attn(h, input_pos, kv, order)
            order = ordered_for(self.fc1, x)
            h, x = self.final_layer_norm(x, delta, order)
            return x, self.mlp(h, order)
        x = x if delta is None else x + delta
        x, _ = self.self_attn_layer_norm(x, self.self_attn(x, input_pos, kv))
        x, _ = self.final_layer_norm(x, self.mlp(x))
        return x, None

    def mlp(self, x: Tensor, x_ordered: bool = False) -> Tensor:
        """fc2(activation(fc1(x))); x_ordered: x in the wgmma kernel's k order, for fc1."""
        return self.fc2(self.activation(self.fc1(x, x_ordered=True) if x_ordered else self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        inner = config.n_heads * config.head_dim
        self.qkv_proj = nn.Linear(config.dim, 3 * inner, bias=config.qkv_bias)  # q_proj | k_proj | v_proj rows
        self.out_proj = nn.Linear(inner, config.dim, bias=config.o_bias)
        self.kv_cache: Optional[PagedKVCache] = None

    def forward(self, x: Tensor, input_pos: Tensor, kv: KVBatch, x_ordered: bool = False) -> Tensor:
        """x [B, T, dim] (x_ordered: in the wgmma kernel's k order, for qkv_proj)."""
        b, t, _ = x.shape
        qkv = self.qkv_proj(x, x_ordered=True) if x_ordered else self.qkv_proj(x)
        q, k, v = qkv.view(b, t, 3 * self.n_heads, self.head_dim).chunk(3, dim=2)
        self.kv_cache.write(kv.slot_mapping, k, v)
        order = ordered_heads_for(self.out_proj, self.head_dim, x)  # attention writes out_proj's order
        attended = self.kv_cache.attend(q.transpose(1, 2), input_pos, kv, None, order)
        return self.out_proj(attended, x_ordered=True) if order else self.out_proj(attended)
