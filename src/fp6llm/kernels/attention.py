"""Attention over a paged KV cache that reads only each sequence's valid blocks: decode and prefill/extend.

The cache of a layer is k_cache, v_cache [num_blocks, BLOCK_SIZE, Hkv, D]; row b's position p lies in block
block_tables[b, p // BLOCK_SIZE] at offset p % BLOCK_SIZE. A query at position q sees the keys at positions
s <= q, s < seq_lens[b] and, with a sliding window W, s > q - W. The plain PyTorch reference is
models/attention.py's ``paged_attention_reference``; tests/test_attention.py compares the two.

Both kernels are GQA-aware: one program handles the G = H / Hkv query heads of a KV head together (as the rows of
one tile), so each K/V block is loaded once per group, not once per query head. Softmax is the online
(FlashAttention) one: a running max m, a running sum l and an unnormalized accumulator per query row.

- ``paged_decode``: one query token per row. Grid (B, Hkv, SPLITS): FlashDecoding's split-KV, each program takes
  an equal share of the row's valid blocks and writes a partial (acc, m, l); one more kernel combines the splits
  (with one split the program stores the output itself).
  A long context is spread over SPLITS programs instead of one, which keeps the GPU busy at small batch.
- ``paged_prefill``: T query tokens per row (a prompt chunk after its cached prefix). Grid (B, Hkv,
  cdiv(T, BLOCK_T)); each program loops over the blocks up to its last query's position (causal).
- ``write_kv``: the new tokens' keys and values into their slots, both in one launch.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch
from .pdl import wait_for_previous
from .x_order import wgmma_ordered

NO_WINDOW = 0  # the sliding_window argument of the kernels when there is none
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
MASKED = tl.constexpr(-1.0e30)  # a finite "minus infinity": a fully masked block leaves m finite and adds exp(MASKED - m) = 0


@triton.jit
def _attend_block(q, k_cache, v_cache, block_tables, b, kv_head, block_index, query_pos, seq_len, window, m_i, l_i,
                  acc, sm_scale, stride_tb, stride_cb, stride_cs, stride_ch, BLOCK_SIZE: tl.constexpr,
                  BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_FP32: tl.constexpr, KEYS: tl.constexpr):
    """One chunk of the online softmax, KEYS keys (KEYS / BLOCK_SIZE whole cache blocks): q [ROWS, BLOCK_D] with
    positions query_pos [ROWS]; block_index counts chunks."""
    dims = tl.arange(0, BLOCK_D)
    key_pos = block_index * KEYS + tl.arange(0, KEYS)
    in_row = key_pos < seq_len
    # each key's cache block (a block's keys load the same entry: cache hits); block * stride can pass 2**31
    block = tl.load(block_tables + b * stride_tb + key_pos // BLOCK_SIZE, mask=in_row, other=0).to(tl.int64)
    # K/V of these keys: [KEYS, BLOCK_D] at k_cache[block, offset, kv_head, :]
    kv_offsets = block[:, None] * stride_cb + (key_pos % BLOCK_SIZE)[:, None] * stride_cs + kv_head * stride_ch + \
        dims[None, :]
    kv_mask = in_row[:, None] & (dims[None, :] < HEAD_DIM)
    k = tl.load(k_cache + kv_offsets, mask=kv_mask, other=0.0)
    v = tl.load(v_cache + kv_offsets, mask=kv_mask, other=0.0)
    k, v = k.to(q.dtype), v.to(q.dtype)
    if DOT_FP32:  # Triton 3.6's interpreter gets bf16 tl.dot wrong; fp32 operands hold bf16 values exactly
        q, k, v = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32)
    scores = tl.dot(q, tl.trans(k), out_dtype=tl.float32) * sm_scale  # [ROWS, KEYS]
    visible = (key_pos[None, :] <= query_pos[:, None]) & (key_pos[None, :] < seq_len)
    if window > 0:
        visible = visible & (key_pos[None, :] > query_pos[:, None] - window)
    scores = tl.where(visible, scores, MASKED)
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.where(visible, tl.exp(scores - m_new[:, None]), 0.0)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, out_dtype=tl.float32)
    return m_new, l_i, acc


@triton.jit
def _decode_kernel(q_ptr, k_cache, v_cache, block_tables, seq_lens, input_pos, acc_ptr, ml_ptr, out_ptr, sm_scale,
                   window, stride_qb, stride_qh, stride_tb, stride_cb, stride_cs, stride_ch, stride_pb, stride_ob,
                   stride_oh, GROUPS: tl.constexpr, SPLITS: tl.constexpr, BLOCK_G: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_FP32: tl.constexpr,
                   BLOCK_N: tl.constexpr, ORDER: tl.constexpr, PDL: tl.constexpr):
    """Program (b, kv_head, split): the GROUPS query heads of kv_head over the split's share of row b's blocks.
    SPLITS > 1: writes acc [B, H, SPLITS, BLOCK_D] (unnormalized) and ml [B, H, SPLITS, 2] (running max, sum) for
    _combine_kernel; SPLITS == 1: the normalized output, out [B, H, 1, D] in its dtype (ORDER: each head's D in
    the wgmma kernel's k order, D a multiple of 128, for an o_proj that runs it)."""
    wait_for_previous(PDL)  # launched early (kernels/launch.py): the previous kernel's writes first
    b, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    heads = kv_head * GROUPS + tl.arange(0, BLOCK_G)
    head_mask = tl.arange(0, BLOCK_G) < GROUPS
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=head_mask[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
    position = tl.load(input_pos + b * stride_pb)
    seq_len = tl.minimum(tl.load(seq_lens + b), position + 1)
    query_pos = tl.zeros([BLOCK_G], dtype=tl.int32) + position
    # in chunks of BLOCK_N keys (BLOCK_N / BLOCK_SIZE cache blocks): fewer, larger steps of the loop below
    first = tl.where(window > 0, tl.maximum(position - window + 1, 0) // BLOCK_N, 0)  # the window's first chunk
    last = tl.cdiv(seq_len, BLOCK_N)
    per_split = tl.cdiv(last - first, SPLITS)
    start = first + split * per_split
    stop = tl.minimum(start + per_split, last)
    m_i = tl.zeros([BLOCK_G], dtype=tl.float32) + MASKED
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for block_index in range(start, stop):
        m_i, l_i, acc = _attend_block(q, k_cache, v_cache, block_tables, b, kv_head, block_index, query_pos,
                                      seq_len, window, m_i, l_i, acc, sm_scale, stride_tb, stride_cb, stride_cs,
                                      stride_ch, BLOCK_SIZE, BLOCK_D, HEAD_DIM, DOT_FP32, BLOCK_N)
    if SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        out = out.to(out_ptr.dtype.element_ty)
        if ORDER:
            out = wgmma_ordered(out, BLOCK_G, BLOCK_D)
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + dims[None, :], out,
                 mask=head_mask[:, None] & (dims[None, :] < HEAD_DIM))
    else:
        row = (b * GROUPS * tl.num_programs(1) + heads) * SPLITS + split  # [B, H, SPLITS] flattened
        tl.store(acc_ptr + row[:, None] * BLOCK_D + dims[None, :], acc, mask=head_mask[:, None])
        tl.store(ml_ptr + row * 2, m_i, mask=head_mask)
        tl.store(ml_ptr + row * 2 + 1, l_i, mask=head_mask)


@triton.jit
def _combine_kernel(acc_ptr, ml_ptr, out_ptr, H, stride_ob, stride_oh, SPLITS: tl.constexpr,
                    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, ORDER: tl.constexpr,
                    PDL: tl.constexpr):
    """Program (b H + h): the splits' partials of row b, head h combined, out = sum_s e^(m_s - M) acc_s /
    sum_s e^(m_s - M) l_s with M = max_s m_s, stored in out's dtype (one launch where torch ops took nine)."""
    wait_for_previous(PDL)  # launched early (kernels/launch.py): the previous kernel's writes first
    row = tl.program_id(0)
    b, h = row // H, row % H
    s = tl.arange(0, BLOCK_S)
    valid = s < SPLITS
    m = tl.load(ml_ptr + (row * SPLITS + s) * 2, mask=valid, other=MASKED)
    l_s = tl.load(ml_ptr + (row * SPLITS + s) * 2 + 1, mask=valid, other=0.0)
    weight = tl.where(valid, tl.exp(m - tl.max(m, axis=0)), 0.0)
    dims = tl.arange(0, BLOCK_D)
    acc = tl.load(acc_ptr + (row * SPLITS + s)[:, None] * BLOCK_D + dims[None, :], mask=valid[:, None], other=0.0)
    out = tl.sum(weight[:, None] * acc, axis=0) / tl.sum(weight * l_s, axis=0)
    out = out.to(out_ptr.dtype.element_ty)
    if ORDER:
        out = tl.reshape(wgmma_ordered(tl.reshape(out, (1, BLOCK_D)), 1, BLOCK_D), (BLOCK_D,))
    tl.store(out_ptr + b * stride_ob + h * stride_oh + dims, out, mask=dims < HEAD_DIM)


@triton.jit
def _prefill_kernel(q_ptr, k_cache, v_cache, block_tables, seq_lens, input_pos, out_ptr, sm_scale, window, T,
                    stride_qb, stride_qh, stride_qt, stride_tb, stride_cb, stride_cs, stride_ch, stride_pb,
                    stride_ob, stride_oh, stride_ot, GROUPS: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_G: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                    DOT_FP32: tl.constexpr, ORDER: tl.constexpr):
    """Program (b, kv_head, tile): query tokens tile * BLOCK_T .. + BLOCK_T of the GROUPS heads of kv_head, as
    BLOCK_T * BLOCK_G rows (token-major), over row b's blocks up to the tile's last query position."""
    b, kv_head, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = tl.arange(0, BLOCK_T * BLOCK_G)
    tokens = tile * BLOCK_T + rows // BLOCK_G
    group = rows % BLOCK_G
    heads = kv_head * GROUPS + group
    row_mask = (tokens < T) & (group < GROUPS)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims[None, :] < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + tokens[:, None] * stride_qt + dims[None, :],
                mask=row_mask[:, None] & dim_mask, other=0.0)
    query_pos = tl.load(input_pos + b * stride_pb + tokens, mask=tokens < T, other=0).to(tl.int32)
    seq_len = tl.load(seq_lens + b)
    highest = tl.max(tl.where(row_mask, query_pos, 0), axis=0)
    last = tl.cdiv(tl.minimum(seq_len, highest + 1), BLOCK_SIZE)
    lowest = tl.min(tl.where(row_mask, query_pos, highest), axis=0)
    first = tl.where(window > 0, tl.maximum(lowest - window + 1, 0) // BLOCK_SIZE, 0)  # the window's first block
    m_i = tl.zeros([BLOCK_T * BLOCK_G], dtype=tl.float32) + MASKED
    l_i = tl.zeros([BLOCK_T * BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_T * BLOCK_G, BLOCK_D], dtype=tl.float32)
    for block_index in range(first, last):
        m_i, l_i, acc = _attend_block(q, k_cache, v_cache, block_tables, b, kv_head, block_index, query_pos,
                                      seq_len, window, m_i, l_i, acc, sm_scale, stride_tb, stride_cb, stride_cs,
                                      stride_ch, BLOCK_SIZE, BLOCK_D, HEAD_DIM, DOT_FP32, BLOCK_SIZE)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out = out.to(out_ptr.dtype.element_ty)
    if ORDER:
        out = wgmma_ordered(out, BLOCK_T * BLOCK_G, BLOCK_D)
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + tokens[:, None] * stride_ot + dims[None, :],
             out, mask=row_mask[:, None] & dim_mask)


def _check_order(order: bool, d: int) -> None:
    if order and d % 128:
        raise ValueError(f"attention's output in the wgmma kernel's k order needs a head size that is a multiple of "
                         f"128, got {d}")


def _dot_fp32(q: Tensor) -> bool:
    return INTERPRETER and q.dtype == torch.bfloat16


def _check(q: Tensor, k_cache: Tensor, block_tables: Tensor) -> tuple:
    b, h, t, d = q.shape
    if k_cache.dim() != 4 or k_cache.shape[3] != d or h % k_cache.shape[2]:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} does not fit q {tuple(q.shape)} "
                         f"(want [num_blocks, BLOCK_SIZE, Hkv, {d}] with Hkv dividing {h})")
    if q.stride(3) != 1 or k_cache.stride(3) != 1:
        raise ValueError("q and the cache need a contiguous head dimension")
    if block_tables.shape[0] != b:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for a batch of {b}")
    groups = h // k_cache.shape[2]
    # tl.dot wants every tile side >= 16
    return groups, max(16, triton.next_power_of_2(groups)), max(16, triton.next_power_of_2(d))


DECODE_KEYS = 64  # keys per step of the decode kernel's loop (a multiple of the cache's BLOCK_SIZE)


def decode_keys(block_size: int) -> int:
    """Keys per loop step of the decode kernel: DECODE_KEYS, a whole number of cache blocks."""
    return max(block_size, DECODE_KEYS // block_size * block_size)


def decode_splits(max_blocks: int, batch_kv_heads: int, target_programs: int = 256) -> int:
    """Split-KV factor: enough programs to fill a GPU (~target_programs) without splits of less than one block."""
    return max(1, min(max_blocks, target_programs // max(1, batch_kv_heads), 16))


def decode_launch(table_width: int, block_size: int, batch_kv_heads: int, keys: Optional[int] = None,
                  splits: Optional[int] = None) -> tuple:
    """(keys per loop step, splits) of paged_decode for a block table of table_width blocks of block_size
    positions: the given ones, else decode_keys and decode_splits over the table's chunks of that many keys.
    Raises ValueError for keys that are not a power of 2 and a multiple of block_size."""
    keys = decode_keys(block_size) if keys is None else keys
    if keys % block_size or keys & (keys - 1):
        raise ValueError(f"keys per step must be a power of 2 and a multiple of the cache block ({block_size}), "
                         f"not {keys}")
    return keys, splits or decode_splits(-(-table_width * block_size // keys), batch_kv_heads)


def paged_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                 input_pos: Tensor, sliding_window: Optional[int] = None, splits: Optional[int] = None,
                 keys: Optional[int] = None, order: bool = False) -> Tensor:
    """Decode attention: q [B, H, 1, D] -> [B, H, 1, D] in q's dtype; reads ceil(seq_len / BLOCK_SIZE) blocks of
    each row (from the window's first block with a sliding window), ``keys`` per loop step (default decode_keys);
    order: each head's D in the wgmma kernel's k order (D a multiple of 128). Raises ValueError for mismatched
    shapes."""
    b, h, t, d = q.shape
    if t != 1:
        raise ValueError(f"paged_decode takes one query token per row, got {t}")
    _check_order(order, d)
    groups, block_g, block_d = _check(q, k_cache, block_tables)
    n_kv, block_size = k_cache.shape[2], k_cache.shape[1]
    keys, splits = decode_launch(block_tables.shape[1], block_size, b * n_kv, keys, splits)
    out = torch.empty(b, h, 1, d, dtype=q.dtype, device=q.device)
    if splits == 1:  # the program normalizes and stores the output itself
        acc = ml = out
    else:
        acc = torch.empty(b, h, splits, block_d, dtype=torch.float32, device=q.device)
        ml = torch.empty(b, h, splits, 2, dtype=torch.float32, device=q.device)
    _decode_kernel[(b, n_kv, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, input_pos, acc, ml, out, d ** -0.5, sliding_window or NO_WINDOW,
        q.stride(0), q.stride(1), block_tables.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        input_pos.stride(0), out.stride(0), out.stride(1), GROUPS=groups, SPLITS=splits, BLOCK_G=block_g,
        BLOCK_SIZE=block_size, BLOCK_D=block_d, HEAD_DIM=d, DOT_FP32=_dot_fp32(q), BLOCK_N=keys, ORDER=order,
        **launch.triton_options(q.device))
    if splits > 1:
        _combine_kernel[(b * h,)](acc, ml, out, h, out.stride(0), out.stride(1), SPLITS=splits,
                                  BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_D=block_d, HEAD_DIM=d,
                                  ORDER=order, **launch.triton_options(q.device))
    return out


def paged_prefill(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                  input_pos: Tensor, sliding_window: Optional[int] = None, block_t: int = 16,
                  order: bool = False) -> Tensor:
    """Prefill/extend attention: q [B, H, T, D] at positions input_pos [B, T] -> [B, H, T, D] in q's dtype; each
    tile of block_t tokens reads the blocks up to its last position; order as paged_decode's. Raises ValueError for
    mismatched shapes."""
    b, h, t, d = q.shape
    _check_order(order, d)
    groups, block_g, block_d = _check(q, k_cache, block_tables)
    block_g = triton.next_power_of_2(groups)  # rows are BLOCK_T * BLOCK_G: >= 16 through BLOCK_T
    block_t = max(block_t, 16 // block_g)
    out = torch.empty(b, h, t, d, dtype=q.dtype, device=q.device)
    n_kv, block_size = k_cache.shape[2], k_cache.shape[1]
    _prefill_kernel[(b, n_kv, triton.cdiv(t, block_t))](
        q, k_cache, v_cache, block_tables, seq_lens, input_pos, out, d ** -0.5, sliding_window or NO_WINDOW, t,
        q.stride(0), q.stride(1), q.stride(2), block_tables.stride(0), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), input_pos.stride(0), out.stride(0), out.stride(1), out.stride(2), GROUPS=groups,
        BLOCK_T=block_t, BLOCK_G=block_g, BLOCK_SIZE=block_size, BLOCK_D=block_d, HEAD_DIM=d, DOT_FP32=_dot_fp32(q),
        ORDER=order)
    return out


@triton.jit
def _write_kernel(k_ptr, v_ptr, k_cache, v_cache, slot_mapping, T, stride_kb, stride_kt, stride_kh, stride_vb,
                  stride_vt, stride_vh, stride_sb, stride_cs, stride_ch, N_KV: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Program (b, t): token t of row b's keys and values [Hkv, D] into slot slot_mapping[b, t] of the caches
    (viewed as [num_blocks * BLOCK_SIZE, Hkv, D], slot stride stride_cs)."""
    b, t = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slot_mapping + b * stride_sb + t).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < N_KV) & (dims < HEAD_DIM)
    k = tl.load(k_ptr + b * stride_kb + t * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(v_ptr + b * stride_vb + t * stride_vt + heads * stride_vh + dims, mask=mask)
    target = slot * stride_cs + heads * stride_ch + dims
    tl.store(k_cache + target, k.to(k_cache.dtype.element_ty), mask=mask)
    tl.store(v_cache + target, v.to(v_cache.dtype.element_ty), mask=mask)


def write_kv_kernel(k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor, k: Tensor, v: Tensor) -> None:
    """k_cache.view(-1, Hkv, D)[slot_mapping] = k (and v) in one launch: k, v [B, T, Hkv, D] (any strides but a
    contiguous D), slot_mapping int [B, T], caches [num_blocks, BLOCK_SIZE, Hkv, D] contiguous."""
    b, t, n_kv, d = k.shape
    if k.stride(3) != 1 or v.stride(3) != 1 or not k_cache.is_contiguous() or not v_cache.is_contiguous():
        raise ValueError("write_kv needs a contiguous head dimension in k, v and contiguous caches")
    _write_kernel[(b, t)](
        k, v, k_cache, v_cache, slot_mapping, t, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), slot_mapping.stride(0), k_cache.stride(1), k_cache.stride(2), N_KV=n_kv,
        BLOCK_H=triton.next_power_of_2(n_kv), BLOCK_D=triton.next_power_of_2(d), HEAD_DIM=d)
