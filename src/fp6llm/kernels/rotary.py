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


def rotary(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x rotated by its positions' angles (module docstring); decoder_ops.rotary checks the arguments."""
    b, t, h, d = x.shape
    out = torch.empty(b, t, h, d, dtype=x.dtype, device=x.device)
    if out.numel():
        rotary_kernel[(b * t, triton.cdiv(h, BLOCK_H))](
            x, positions, cos, sin, out, t, h, d // 2, x.stride(0), x.stride(1), x.stride(2), positions.stride(0),
            positions.stride(1), cos.stride(0), BLOCK_H=BLOCK_H, BLOCK_HALF=triton.next_power_of_2(d // 2))
    return out

