"""Residual add + RMSNorm (Llama family) or LayerNorm (OPT) in one pass over each row.

    total = x + delta                          (delta optional: the first layer has no residual to add)
    RMSNorm:   out = (total * rsqrt(mean(total^2) + eps)).to(dtype) * weight
    LayerNorm: out = (total - mean) * rsqrt(var(total) + eps) * weight + bias

x, delta: float16/bfloat16/float32 [rows, D] (unit column stride, any row stride); weight, bias: [D] of any float
dtype. out and total: x's dtype [rows, D], contiguous. One program per row reads x and delta once and writes total
and out once; the statistics are float32. RMSNorm rounds the normalized row to x's dtype before the weight, as
Hugging Face's LlamaRMSNorm does, so that product is the dtype's own rounding of two dtype values. With order, out's
columns are in the wgmma kernel's k order (x_order.wgmma_x_order_reference; D a multiple of 128): out feeds a wgmma
GEMM, which then needs no x_order launch.

The unfused PyTorch form (an add, then float, pow, mean, add, rsqrt, mul, cast, weight) launches ~8 kernels per norm.
The PyTorch reference, and the custom op that runs this kernel on CUDA: decoder_ops.py (add_norm_reference).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import launch
from .pdl import wait_for_previous
from .x_order import wgmma_ordered

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def add_norm_kernel(x_ptr, delta_ptr, weight_ptr, bias_ptr, out_ptr, total_ptr, d, x_stride, delta_stride, eps,
                    HAS_DELTA: tl.constexpr, RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr,
                    ORDER: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)  # launched early (kernels/launch.py): the previous kernel's writes first
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < d
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        # summed in float32 and rounded to the dtype, as PyTorch's x + delta: the residual stays in the model's dtype
        delta = tl.load(delta_ptr + row * delta_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + delta.to(tl.float32)).to(x.dtype)
        tl.store(total_ptr + row * d + cols, x, mask=mask)
    total = x.to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if RMS:
        rstd = 1.0 / tl.sqrt(tl.sum(total * total, axis=0) / d + eps)
        out = (total * rstd).to(x.dtype).to(tl.float32) * weight
    else:
        mean = tl.sum(total, axis=0) / d
        centered = tl.where(mask, total - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / d + eps)
        out = centered * rstd * weight
        if HAS_BIAS:
            out += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = out.to(x.dtype)
    if ORDER:
        out = tl.reshape(wgmma_ordered(tl.reshape(out, (1, BLOCK_D)), 1, BLOCK_D), (BLOCK_D,))
    tl.store(out_ptr + row * d + cols, out, mask=mask)


def add_norm(x: torch.Tensor, delta: Optional[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
             eps: float, rms: bool, order: bool = False) -> tuple:
    """(out, total) of the module docstring for x (and delta) [..., D]; total is x itself when delta is None; order:
    out in the wgmma kernel's k order.

    Raises ValueError for mismatched shapes or dtypes, a last dimension without unit stride, or order with D not a
    multiple of 128.
    """
    d = x.shape[-1]
    if order and d % 128:
        raise ValueError(f"out in the wgmma kernel's k order needs D a multiple of 128, got {d}")
    if x.dtype not in DTYPES or (delta is not None and (delta.shape != x.shape or delta.dtype != x.dtype)):
        raise ValueError(f"x must be float16/bfloat16/float32 and delta of x's shape and dtype, got x {x.dtype} "
                         f"{tuple(x.shape)}, delta {None if delta is None else (delta.dtype, tuple(delta.shape))}")
    if weight.shape != (d,) or (bias is not None and bias.shape != (d,)):
        raise ValueError(f"weight and bias must be [{d}], got {tuple(weight.shape)} and "
                         f"{None if bias is None else tuple(bias.shape)}")
    rows_x = x.reshape(-1, d)
    rows_delta = rows_x if delta is None else delta.reshape(-1, d)
    if rows_x.stride(1) != 1 or rows_delta.stride(1) != 1:
        raise ValueError("x and delta need a unit stride along their last dimension")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    total = x if delta is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows_x.shape[0]:
        add_norm_kernel[(rows_x.shape[0],)](
            rows_x, rows_delta, weight, weight if bias is None else bias, out, total, d, rows_x.stride(0),
            rows_delta.stride(0), eps, HAS_DELTA=delta is not None, RMS=rms, HAS_BIAS=bias is not None,
            BLOCK_D=triton.next_power_of_2(d), ORDER=order, num_warps=4 if d <= 4096 else 8,
            **launch.triton_options(x.device))
    return out, total

