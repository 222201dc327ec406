"""Rotary position embedding (RoPE), halves layout (Hugging Face checkpoints), from a table of angles.

    out[..., i]         = x[..., i] * cos[p, i] - x[..., i + D/2] * sin[p, i]
    out[..., i + D/2]   = x[..., i + D/2] * cos[p, i] + x[..., i] * sin[p, i]        p = positions[b, t]

x: float16/bfloat16/float32 [B, T, H, D] (unit stride along D, any other strides: q and k heads of a fused qkv
projection's output go through in one launch); positions: int64 [B, T]; cos, sin: float32 [S, D/2], the model's
table of angles (position x frequency, already rescaled for Llama 3 / linear scaling by models/llama.py's
rope_frequencies). out: x's dtype [B, T, H, D], contiguous. The rotation is computed in float32 and rounded once.

One program rotates BLOCK_H heads of one token, reading that position's row of the table once; the table lookup
replaces the per-forward gathers and the unfused form's ~7 kernels (muls, sub, add, cat) per tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_H = 4  # heads per program


@triton.jit
def rotary_kernel(x_ptr, pos_ptr, cos_ptr, sin_ptr, out_ptr, t, h, half, stride_b, stride_t, stride_h,
                  pos_stride_b, pos_stride_t, table_stride, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    token = tl.program_id(0)
    b, i = (token // t).to(tl.int64), (token % t).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < half
    mask = (heads < h)[:, None] & col_mask[None, :]
    position = tl.load(pos_ptr + b * pos_stride_b + i * pos_stride_t)
    cos = tl.load(cos_ptr + position * table_stride + cols, mask=col_mask, other=0.0)[None, :]
    sin = tl.load(sin_ptr + position * table_stride + cols, mask=col_mask, other=0.0)[None, :]
    src = x_ptr + b * stride_b + i * stride_t + heads[:, None].to(tl.int64) * stride_h + cols[None, :]
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + half, mask=mask, other=0.0)
    first = x1.to(tl.float32) * cos - x2.to(tl.float32) * sin
    second = x2.to(tl.float32) * cos + x1.to(tl.float32) * sin
    dst = out_ptr + (token.to(tl.int64) * h + heads[:, None]) * 2 * half + cols[None, :]
    tl.store(dst, first.to(x1.dtype), mask=mask)
    tl.store(dst + half, second.to(x1.dtype), mask=mask)


def check_rotary_args(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """ValueError naming the argument unless the shapes and dtypes are the module docstring's."""
    if x.dim() != 4 or x.shape[-1] % 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [B, T, H, D] with an even D of unit stride, got {tuple(x.shape)} strides "
                         f"{x.stride()}")
    if positions.shape != x.shape[:2] or positions.dtype != torch.int64:
        raise ValueError(f"positions must be int64 {tuple(x.shape[:2])}, got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    if cos.dim() != 2 or cos.shape[1] != x.shape[-1] // 2 or sin.shape != cos.shape or cos.dtype != torch.float32 \
            or sin.dtype != torch.float32 or cos.stride() != sin.stride() or cos.stride(1) != 1:
        raise ValueError(f"cos and sin must be float32 [S, {x.shape[-1] // 2}] of one layout, got {cos.dtype} "
                         f"{tuple(cos.shape)} and {sin.dtype} {tuple(sin.shape)}")


def rotary(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x rotated by its positions' angles (module docstring). Raises ValueError as check_rotary_args does."""
    check_rotary_args(x, positions, cos, sin)
    b, t, h, d = x.shape
    out = torch.empty(b, t, h, d, dtype=x.dtype, device=x.device)
    if out.numel():
        rotary_kernel[(b * t, triton.cdiv(h, BLOCK_H))](
            x, positions, cos, sin, out, t, h, d // 2, x.stride(0), x.stride(1), x.stride(2), positions.stride(0),
            positions.stride(1), cos.stride(0), BLOCK_H=BLOCK_H, BLOCK_HALF=triton.next_power_of_2(d // 2))
    return out


def rotary_reference(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch of rotary: float32 rotation, rounded once to x's dtype."""
    cos, sin = cos[positions][:, :, None], sin[positions][:, :, None]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
