"""What the decoders share: a paged KV cache, the attention over it, and the choice of the logits' tokens.

Each layer's cache is a pool of fixed-size blocks, two tensors [num_blocks, block_size, n_kv_heads, head_dim].
Which blocks hold which sequence is the caller's business (engine/blocks.py allocates them): a forward pass gets a
``KVBatch`` saying, for each row of the batch, its block table (the blocks of its positions 0, block_size, ...), how
many positions are valid once this forward has written its tokens (seq_lens), and the slot (block * block_size +
offset) where each new token's key and value go. Without one (``kv=None``) the model uses the contiguous layout of
``setup_caches(max_batch_size, max_seq_len)``: row b owns its own run of blocks, which is a static per-row cache.

Positions are per row (input_pos [B, T]), so one batch can hold prompts of different lengths (right-padded) and
sequences at different decode steps (continuous batching). A query at position p sees the keys at positions <= p
(and > p - window with a sliding window) of its own row.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import launch
from ..kernels.wgmma_order import wgmma_x_order_reference
from ..nn import ordered_for

BLOCK_SIZE = 16  # positions per cache block (vLLM's default too)
NULL_BLOCK = 0  # a scratch block nobody owns: padding tokens write here, unused block-table entries point here


class KVBatch(NamedTuple):
    """Where a forward's rows live in the paged cache (int32 tensors on the model's device).

    block_tables [B, W]: row b's blocks in position order (unused entries NULL_BLOCK); seq_lens [B]: valid positions
    of row b after this forward; slot_mapping [B, T]: the cache slot of each new token (padding: a NULL_BLOCK slot).
    """

    block_tables: Tensor
    seq_lens: Tensor
    slot_mapping: Tensor


class PagedKVCache(nn.Module):
    """Keys and values [num_blocks, block_size, n_kv_heads, head_dim] of one layer."""

    def __init__(self, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device=None):
        super().__init__()
        shape = (num_blocks, block_size, n_kv_heads, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write(self, slot_mapping: Tensor, k: Tensor, v: Tensor) -> None:
        """Store k, v [B, T, Hkv, D] at the slots slot_mapping [B, T] (models whose k is not rotated as it enters the
        cache; Llama's go through rotate_and_write)."""
        direct = paged_decode is not None and launch.direct(self.k_cache, slot_mapping, k, v)
        (_write_kv_cuda if direct else write_kv)(self.k_cache, self.v_cache, slot_mapping, k, v)

    def rotate_and_write(self, slot_mapping: Tensor, qkv: Tensor, n_q: int, positions: Tensor, cos: Tensor,
                         sin: Tensor) -> Tensor:
        """A fused qkv projection's output [B, T, n_q + 2 Hkv, D]: returns its q heads rotated (rotary, positions
        [B, T] in the table cos, sin), and stores its k heads rotated and its v heads at the slots slot_mapping
        [B, T] (write), in one op. Raises ValueError for shapes other than those."""
        from ..decoder_ops import check_rotary_args
        n_kv = self.k_cache.shape[2]
        if qkv.dim() != 4 or qkv.shape[2] != n_q + 2 * n_kv or qkv.shape[3] != self.k_cache.shape[3]:
            raise ValueError(f"qkv must be [B, T, {n_q} + 2 x {n_kv}, {self.k_cache.shape[3]}] for this cache, got "
                             f"{tuple(qkv.shape)}")
        check_rotary_args(qkv, positions, cos, sin)
        if slot_mapping.shape != qkv.shape[:2]:
            raise ValueError(f"slot_mapping must be {tuple(qkv.shape[:2])}, got {tuple(slot_mapping.shape)}")
        direct = paged_decode is not None and launch.direct(qkv, positions, cos, sin, self.k_cache, slot_mapping)
        op = _rotary_write_kv_cuda if direct else rotary_write_kv
        return op(qkv, positions, cos, sin, self.k_cache, self.v_cache, slot_mapping, n_q)

    def attend(self, q: Tensor, input_pos: Tensor, kv: KVBatch, sliding_window: Optional[int] = None,
               order: bool = False) -> Tensor:
        """q [B, H, T, D] over the cached keys/values of each row -> [B, T, H * D]; order: each head's D in the wgmma
        kernel's k order (D a multiple of 128), for an o_proj that takes it (ordered_heads_for)."""
        b, h, t, d = q.shape
        out = paged_attention(q, self.k_cache, self.v_cache, kv.block_tables, kv.seq_lens, input_pos, sliding_window,
                              order)
        return out.transpose(1, 2).reshape(b, t, h * d)


def write_kv_reference(k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor, k: Tensor, v: Tensor) -> None:
    """k_cache.view(-1, Hkv, D)[slot_mapping] = k (and v): k, v [B, T, Hkv, D], slot_mapping int [B, T]."""
    slots = slot_mapping.reshape(-1).long()
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k.reshape(-1, *k.shape[2:]).to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v.reshape(-1, *v.shape[2:]).to(v_cache.dtype))


@torch.library.custom_op("fp6llm::write_kv", mutates_args=("k_cache", "v_cache"))
def write_kv(k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor, k: Tensor, v: Tensor) -> None:
    """Store k, v [B, T, Hkv, D] at the slots slot_mapping [B, T] of the caches (one op: the reference here, one
    Triton kernel on CUDA)."""
    write_kv_reference(k_cache, v_cache, slot_mapping, k, v)


@torch.library.custom_op("fp6llm::rotary_write_kv", mutates_args=("k_cache", "v_cache"))
def rotary_write_kv(qkv: Tensor, positions: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                    slot_mapping: Tensor, n_q: int) -> Tensor:
    """PagedKVCache.rotate_and_write's op: the reference here (rotary, then write_kv), one Triton kernel on CUDA
    (kernels/rotary.py)."""
    from ..decoder_ops import rotary_reference
    n_kv = (qkv.shape[2] - n_q) // 2
    rotated = rotary_reference(qkv[:, :, :n_q + n_kv], positions, cos, sin)
    write_kv_reference(k_cache, v_cache, slot_mapping, rotated[:, :, n_q:], qkv[:, :, n_q + n_kv:])
    return rotated[:, :, :n_q].contiguous()


@rotary_write_kv.register_fake
def _(qkv, positions, cos, sin, k_cache, v_cache, slot_mapping, n_q):
    return qkv.new_empty(*qkv.shape[:2], n_q, qkv.shape[3])


def paged_attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                              input_pos: Tensor, sliding_window: Optional[int] = None) -> Tensor:
    """Attention of q [B, H, T, D] over each row's cached keys/values -> [B, H, T, D] in q's dtype.

    k_cache, v_cache [num_blocks, BLOCK, Hkv, D]; block_tables int [B, W]: all W blocks are gathered, so give only as
    many columns as the longest row needs; seq_lens int [B]; input_pos int [B, T]. Query head h reads KV head
    h // G (G = H / Hkv). Instead of repeating K and V for every query head (a copy of the whole context per layer),
    the G query heads of a group are stacked along T: q [B, Hkv, G * T, D] against k/v [B, Hkv, S, D] with the mask
    repeated G times along T (tiny at decode; B * G * T * S bytes at prefill, about one K/V repeat).
    """
    b, h, t, d = q.shape
    _, block, n_kv, _ = k_cache.shape
    width = block_tables.shape[1]
    tables = block_tables.long()
    k = k_cache[tables].view(b, width * block, n_kv, d).transpose(1, 2).to(q.dtype)  # [B, Hkv, S, D]
    v = v_cache[tables].view(b, width * block, n_kv, d).transpose(1, 2).to(q.dtype)
    key_pos = torch.arange(width * block, device=q.device)
    query_pos = input_pos[:, None, :, None]  # [B, 1, T, 1]
    mask = (key_pos <= query_pos) & (key_pos < seq_lens[:, None, None, None])
    if sliding_window is not None:
        mask = mask & (key_pos > query_pos - sliding_window)
    groups = h // n_kv
    out = F.scaled_dot_product_attention(q.reshape(b, n_kv, groups * t, d), k, v,
                                         attn_mask=mask.repeat(1, 1, groups, 1))
    return out.view(b, h, t, d)


@torch.library.custom_op("fp6llm::paged_attention", mutates_args=())
def paged_attention_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                       input_pos: Tensor, sliding_window: int) -> Tensor:
    """Reference implementation; sliding_window 0 means none."""
    return paged_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, input_pos, sliding_window or None)


try:
    from ..kernels.attention import paged_decode, paged_prefill, write_kv_kernel
except ImportError:  # no Triton: the reference serves every device
    paged_decode = None

if paged_decode is not None:
    # The ops' CUDA implementations, which the callers above also call directly in eager mode (launch.direct).
    @write_kv.register_kernel("cuda")
    def _write_kv_cuda(k_cache, v_cache, slot_mapping, k, v):
        write_kv_kernel(k_cache, v_cache, slot_mapping, k, v)

    @rotary_write_kv.register_kernel("cuda")
    def _rotary_write_kv_cuda(qkv, positions, cos, sin, k_cache, v_cache, slot_mapping, n_q):
        from ..kernels.rotary import rotary_write_kv as kernel
        return kernel(qkv, positions, cos, sin, k_cache, v_cache, slot_mapping, n_q)

    def _paged_attention_cuda(q, k_cache, v_cache, block_tables, seq_lens, input_pos, sliding_window, order=False):
        kernel = paged_decode if q.shape[2] == 1 else paged_prefill
        return kernel(q, k_cache, v_cache, block_tables, seq_lens, input_pos, sliding_window or None, order=order)

    @paged_attention_op.register_kernel("cuda")
    def _(q, k_cache, v_cache, block_tables, seq_lens, input_pos, sliding_window):
        return _paged_attention_cuda(q, k_cache, v_cache, block_tables, seq_lens, input_pos, sliding_window)


@write_kv.register_fake
def _(k_cache, v_cache, slot_mapping, k, v):
    return None


@paged_attention_op.register_fake
def _(q, k_cache, v_cache, block_tables, seq_lens, input_pos, sliding_window):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                    input_pos: Tensor, sliding_window: Optional[int] = None, order: bool = False) -> Tensor:
    """paged_attention_reference's result [B, H, T, D]; on CUDA from the Triton kernels of kernels/attention.py
    (decode for T = 1, prefill/extend otherwise), which read only each row's valid blocks; in eager mode without
    the op's dispatch (launch.direct). order: each head's D in the wgmma kernel's k order (D a multiple of 128;
    kernels/wgmma_order.py), written so by the kernels in eager mode."""
    if order and q.shape[-1] % 128:
        raise ValueError(f"attention's output in the wgmma kernel's k order needs a head size that is a multiple of "
                         f"128, got {q.shape[-1]}")
    if paged_decode is not None and launch.direct(q, k_cache, block_tables, seq_lens, input_pos):
        return _paged_attention_cuda(q, k_cache, v_cache, block_tables, seq_lens, input_pos, sliding_window, order)
    out = paged_attention_op(q, k_cache, v_cache, block_tables, seq_lens, input_pos, sliding_window or 0)
    return wgmma_x_order_reference(out) if order else out


def ordered_heads_for(o_proj: nn.Module, head_dim: int, x: Tensor) -> bool:
    """Whether attention writes its heads in the wgmma kernel's k order for ``o_proj`` (nn.ordered_for, for the
    rows of x): only heads of a multiple of 128, whose values then fill whole 128-column tiles of o_proj's x."""
    return head_dim % 128 == 0 and ordered_for(o_proj, x)


def blocks_for(positions: int, block_size: int = BLOCK_SIZE) -> int:
    """Blocks that hold ``positions`` positions."""
    return -(-positions // block_size)


def setup_kv_caches(model: nn.Module, max_batch_size: int, max_seq_len: int, dtype: Optional[torch.dtype],
                    device, num_blocks: Optional[int] = None, block_size: int = BLOCK_SIZE) -> torch.device:
    """Give each of model.layers a PagedKVCache of num_blocks blocks in its self_attn (dtype and device default to
    the token embedding's); returns the device.

    num_blocks defaults to the contiguous layout's: NULL_BLOCK + max_batch_size rows of blocks_for(max_seq_len)
    blocks, what a forward without a KVBatch uses. Raises ValueError for fewer than 2 blocks.
    """
    dtype = dtype or model.embed_tokens.weight.dtype
    device = device or model.embed_tokens.weight.device
    per_row = blocks_for(max_seq_len, block_size)
    num_blocks = 1 + max_batch_size * per_row if num_blocks is None else num_blocks
    if num_blocks < 2:
        raise ValueError(f"num_blocks must be >= 2 (one is the scratch block), got {num_blocks}")
    c = model.config
    for layer in model.layers:
        layer.self_attn.kv_cache = PagedKVCache(num_blocks, block_size, c.n_kv_heads, c.head_dim, dtype, device)
    model.max_batch_size, model.max_seq_len = max_batch_size, max_seq_len
    model.num_blocks, model.block_size = num_blocks, block_size
    return device


def contiguous_kv_batch(input_pos: Tensor, max_seq_len: int, block_size: int = BLOCK_SIZE) -> KVBatch:
    """The KVBatch of the contiguous layout: row b owns blocks 1 + b * R .. (b + 1) * R (R = blocks_for(max_seq_len)),
    its token at position p goes to its slot p, and every position up to the row's highest is valid."""
    b = input_pos.shape[0]
    per_row = blocks_for(max_seq_len, block_size)
    first = 1 + per_row * torch.arange(b, device=input_pos.device, dtype=torch.int32)[:, None]
    block_tables = first + torch.arange(per_row, device=input_pos.device, dtype=torch.int32)
    slot_mapping = (first * block_size + input_pos).to(torch.int32)
    return KVBatch(block_tables, (input_pos.amax(dim=1) + 1).to(torch.int32), slot_mapping)


def select_tokens(x: Tensor, logits_at: Optional[Tensor]) -> Tensor:
    """x [B, T, C] at the token indices logits_at [B, K] -> [B, K, C]; all of x when logits_at is None."""
    return x if logits_at is None else x.gather(1, logits_at[:, :, None].expand(-1, -1, x.shape[-1]))
