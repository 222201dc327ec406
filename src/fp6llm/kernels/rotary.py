"""Rotary position embedding (RoPE), halves layout (Hugging Face checkpoints), from a table of angles.

    out[..., i]         = x[..., i] * cos[p, i] - x[..., i + D/2] * sin[p, i]
    out[..., i + D/2]   = x[..., i + D/2] * cos[p, i] + x[..., i] * sin[p, i]        p = positions[b, t]

x: float16/bfloat16/float32 [B, T, H, D] (unit stride along D, any other strides: q and k heads of a fused qkv
projection's output go through in one launch); positions: int64 [B, T]; cos, sin: float32 [S, D/2], the model's
table of angles (position x frequency, already rescaled for Llama 3 / linear scaling by models/llama.py's
rope_frequencies). out: x's dtype [B, T, H, D], contiguous. The rotation is computed in float32 and rounded once.

One program rotates BLOCK_H heads of one token, reading that position's row of the table once; the table lookup
replaces the per-forward gathers and the unfused form's ~7 kernels (muls, sub, add, cat) per tensor.
The PyTorch reference, and the custom op that runs this kernel on CUDA: decoder_ops.py (rotary_reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .pdl import wait_for_previous

BLOCK_H = 4  # heads per program


@triton.jit
def _halves_and_angles(x_ptr, pos_ptr, cos_ptr, sin_ptr, b, i, heads, cols, col_mask, mask, half, stride_b, stride_t,
                       stride_h, pos_stride_b, pos_stride_t, table_stride):
    """Token (b, i)'s heads as halves x1, x2 [BLOCK_H, BLOCK_HALF] and its position's cos, sin [1, BLOCK_HALF]."""
    position = tl.load(pos_ptr + b * pos_stride_b + i * pos_stride_t)
    cos = tl.load(cos_ptr + position * table_stride + cols, mask=col_mask, other=0.0)[None, :]
    sin = tl.load(sin_ptr + position * table_stride + cols, mask=col_mask, other=0.0)[None, :]
    src = x_ptr + b * stride_b + i * stride_t + heads[:, None].to(tl.int64) * stride_h + cols[None, :]
    return tl.load(src, mask=mask, other=0.0), tl.load(src + half, mask=mask, other=0.0), cos, sin


@triton.jit
def rotary_kernel(x_ptr, pos_ptr, cos_ptr, sin_ptr, out_ptr, t, h, half, stride_b, stride_t, stride_h,
                  pos_stride_b, pos_stride_t, table_stride, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    token = tl.program_id(0)
    b, i = (token // t).to(tl.int64), (token % t).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < half
    mask = (heads < h)[:, None] & col_mask[None, :]
    x1, x2, cos, sin = _halves_and_angles(x_ptr, pos_ptr, cos_ptr, sin_ptr, b, i, heads, cols, col_mask, mask, half,
                                          stride_b, stride_t, stride_h, pos_stride_b, pos_stride_t, table_stride)
    first = x1.to(tl.float32) * cos - x2.to(tl.float32) * sin
    second = x2.to(tl.float32) * cos + x1.to(tl.float32) * sin
    dst = out_ptr + (token.to(tl.int64) * h + heads[:, None]) * 2 * half + cols[None, :]
    tl.store(dst, first.to(x1.dtype), mask=mask)
    tl.store(dst + half, second.to(x1.dtype), mask=mask)


def rotary(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x rotated by its positions' angles (module docstring); decoder_ops.rotary checks the arguments."""
    b, t, h, d = x.shape
    out = torch.empty(b, t, h, d, dtype=x.dtype, device=x.device)
    if out.numel():
        rotary_kernel[(b * t, triton.cdiv(h, BLOCK_H))](
            x, positions, cos, sin, out, t, h, d // 2, x.stride(0), x.stride(1), x.stride(2), positions.stride(0),
            positions.stride(1), cos.stride(0), BLOCK_H=BLOCK_H, BLOCK_HALF=triton.next_power_of_2(d // 2))
    return out


@triton.jit
def rotary_write_kernel(x_ptr, pos_ptr, cos_ptr, sin_ptr, q_ptr, k_cache, v_cache, slot_ptr, t, n_q, n_kv, half,
                        stride_b, stride_t, stride_h, pos_stride_b, pos_stride_t, table_stride, slot_stride_b,
                        stride_cs, stride_ch, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, PDL: tl.constexpr):
    """rotary_kernel over a fused qkv projection's heads (n_q of q, n_kv of k, n_kv of v): q's heads rotated into
    q_ptr [B, T, n_q, D], k's rotated and v's as they are into slot slot_ptr[b, t] of the caches (viewed as
    [slots, n_kv, D], slot stride stride_cs): one launch for what rotary and write_kv took two."""
    wait_for_previous(PDL)  # launched early (kernels/launch.py): the previous kernel's writes first
    token = tl.program_id(0)
    b, i = (token // t).to(tl.int64), (token % t).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < half
    mask = (heads < n_q + 2 * n_kv)[:, None] & col_mask[None, :]
    x1, x2, cos, sin = _halves_and_angles(x_ptr, pos_ptr, cos_ptr, sin_ptr, b, i, heads, cols, col_mask, mask, half,
                                          stride_b, stride_t, stride_h, pos_stride_b, pos_stride_t, table_stride)
    rotate = (heads < n_q + n_kv)[:, None]  # q's and k's heads turn, v's do not
    first = tl.where(rotate, x1.to(tl.float32) * cos - x2.to(tl.float32) * sin, x1.to(tl.float32)).to(x1.dtype)
    second = tl.where(rotate, x2.to(tl.float32) * cos + x1.to(tl.float32) * sin, x2.to(tl.float32)).to(x1.dtype)
    is_q = (heads < n_q)[:, None] & mask
    q_dst = q_ptr + (token.to(tl.int64) * n_q + heads[:, None]) * 2 * half + cols[None, :]
    tl.store(q_dst, first, mask=is_q)
    tl.store(q_dst + half, second, mask=is_q)
    slot = tl.load(slot_ptr + b * slot_stride_b + i).to(tl.int64)
    is_k = ((heads >= n_q) & (heads < n_q + n_kv))[:, None] & mask
    k_dst = k_cache + slot * stride_cs + (heads - n_q)[:, None].to(tl.int64) * stride_ch + cols[None, :]
    tl.store(k_dst, first.to(k_cache.dtype.element_ty), mask=is_k)
    tl.store(k_dst + half, second.to(k_cache.dtype.element_ty), mask=is_k)
    is_v = (heads >= n_q + n_kv)[:, None] & mask
    v_dst = v_cache + slot * stride_cs + (heads - n_q - n_kv)[:, None].to(tl.int64) * stride_ch + cols[None, :]
    tl.store(v_dst, first.to(v_cache.dtype.element_ty), mask=is_v)
    tl.store(v_dst + half, second.to(v_cache.dtype.element_ty), mask=is_v)


def rotary_write_kv(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    n_q: int) -> torch.Tensor:
    """q [B, T, n_q, D] (contiguous) of qkv [B, T, n_q + 2 Hkv, D] rotated, with k rotated and v stored into their
    slots of the caches [num_blocks, BLOCK_SIZE, Hkv, D] (contiguous); models/attention.py checks the arguments."""
    b, t, heads, d = qkv.shape
    n_kv = (heads - n_q) // 2
    q = torch.empty(b, t, n_q, d, dtype=qkv.dtype, device=qkv.device)
    if q.numel():
        rotary_write_kernel[(b * t, triton.cdiv(heads, BLOCK_H))](
            qkv, positions, cos, sin, q, k_cache, v_cache, slot_mapping, t, n_q, n_kv, d // 2, qkv.stride(0),
            qkv.stride(1), qkv.stride(2), positions.stride(0), positions.stride(1), cos.stride(0),
            slot_mapping.stride(0), k_cache.stride(1), k_cache.stride(2), BLOCK_H=BLOCK_H,
            BLOCK_HALF=triton.next_power_of_2(d // 2), **launch.triton_options(qkv.device))
    return q
