"""SwiGLU's activation in one pass: out = silu(gate) * up, from the fused gate_up projection's output.

gate_up: float16/bfloat16/float32 [..., 2 I] (gate_proj's I features, then up_proj's; unit last stride, rows
contiguous); out: its dtype, [..., I]. silu(gate) is rounded to the dtype before the product, as PyTorch's
F.silu(gate) * up rounds it, so the product is the dtype's own rounding of two dtype values. With order, out's
columns are in the wgmma kernel's k order (x_order.wgmma_x_order_reference; I a multiple of 128): out feeds a wgmma
GEMM, which then needs no x_order launch.
The PyTorch reference, and the custom op that runs this kernel on CUDA: decoder_ops.py (silu_mul_reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .pdl import wait_for_previous
from .x_order import wgmma_ordered

BLOCK = 1024  # features per program


@triton.jit
def silu_mul_kernel(gate_up_ptr, out_ptr, inner, row_stride, BLOCK: tl.constexpr, ORDER: tl.constexpr,
                    PDL: tl.constexpr):
    wait_for_previous(PDL)  # launched early (kernels/launch.py): the previous kernel's writes first
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inner
    gate = tl.load(gate_up_ptr + row * row_stride + cols, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * row_stride + inner + cols, mask=mask, other=0.0)
    g32 = gate.to(tl.float32)
    silu = (g32 / (1.0 + tl.exp(-g32))).to(gate.dtype)
    out = (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)
    if ORDER:
        out = tl.reshape(wgmma_ordered(tl.reshape(out, (1, BLOCK)), 1, BLOCK), (BLOCK,))
    tl.store(out_ptr + row * inner + cols, out, mask=mask)


def silu_mul(gate_up: torch.Tensor, order: bool = False) -> torch.Tensor:
    """silu(gate) * up of gate_up [..., 2 I] -> [..., I]; order: in the wgmma kernel's k order. Raises ValueError for
    an odd last dimension, or order with I not a multiple of 128."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up must have an even last dimension (gate | up), got {tuple(gate_up.shape)}")
    inner = gate_up.shape[-1] // 2
    if order and inner % 128:
        raise ValueError(f"out in the wgmma kernel's k order needs I a multiple of 128, got {inner}")
    rows = gate_up.reshape(-1, 2 * inner)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    out = torch.empty(*gate_up.shape[:-1], inner, dtype=gate_up.dtype, device=gate_up.device)
    if out.numel():
        silu_mul_kernel[(rows.shape[0], triton.cdiv(inner, BLOCK))](rows, out, inner, rows.stride(0), BLOCK=BLOCK,
                                                                     ORDER=order, **launch.triton_options(rows.device))
    return out

