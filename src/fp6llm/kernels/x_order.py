"""x in the wgmma kernel's k order (cuda/fpx_wgmma.cu): within each 128-column tile, logical column
16 ks + 8 h + 2 t + j (k-step ks of the MMA, its half h, lane t, element j) holds column 32 t + 4 ks + 2 h + j, the
column that layout 2 places in that fragment position (see fpx_small_m.cu). Columns move in pairs (4 bytes).

wgmma_x_order_reference is the PyTorch definition (a view, a permute and a copy; kernels/wgmma_order.py, with its
inverse); wgmma_x_order is one launch of x_order_kernel (on the CPU under the Triton interpreter), which takes the
PDL flag (kernels/launch.py), so the programmatic chain of a decode step is not broken before each wgmma GEMM by a
torch copy (a plain launch waits for its predecessor to complete, and the GEMM then waits for it). Where the kernel
that produces x knows its GEMM runs the wgmma kernel (nn.FPxLinear.takes_ordered_x), it writes x in this order
itself (wgmma_ordered, in norm.py, activation.py, attention.py) and no copy is launched at all.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .pdl import wait_for_previous
from .wgmma_order import wgmma_x_order_reference, wgmma_x_unorder  # noqa: F401 (the references, re-exported)

BLOCK_WORDS = 1024  # column pairs per program (a multiple of a tile's 64)


@triton.jit
def wgmma_ordered(values, ROWS: tl.constexpr, COLS: tl.constexpr):
    """values [ROWS, COLS] (COLS whole 128-column tiles) with each row's columns in the wgmma kernel's k order
    (wgmma_x_order_reference's view and permute, in registers: ptxas makes it shared-memory matrix loads), for a
    kernel that writes x for a wgmma GEMM (norm.py, activation.py, attention.py) and stores it contiguously."""
    ordered = tl.permute(tl.reshape(values, (ROWS, COLS // 128, 4, 8, 2, 2)), (0, 1, 3, 4, 2, 5))
    return tl.reshape(ordered, (ROWS, COLS))


@triton.jit
def x_order_kernel(x_ptr, out_ptr, row_words, k_words, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """out[row, w] = x[row, source(w)] over 4-byte words: output word w = 64 tile + 8 ks + 4 h + t holds input word
    64 tile + 16 t + 2 ks + h (the column pairs of wgmma_x_order_reference)."""
    wait_for_previous(PDL)  # launched early (kernels/launch.py): x is the previous kernel's output
    row = tl.program_id(0).to(tl.int64)
    w = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    r = w % 64
    source = w - r + 16 * (r % 4) + 2 * (r // 8) + (r // 4) % 2
    mask = w < k_words
    tl.store(out_ptr + row * k_words + w, tl.load(x_ptr + row * row_words + source, mask=mask), mask=mask)


def wgmma_x_order(x: torch.Tensor) -> torch.Tensor:
    """wgmma_x_order_reference(x), a new contiguous tensor; on CUDA one x_order_kernel launch. x: FP16/BF16
    [M, K], K a multiple of 128, unit column stride and an even row stride (the wgmma kernel's x)."""
    m, k = x.shape
    if k % 128 or x.stride(1) != 1 or x.stride(0) % 2 or x.element_size() != 2:
        raise ValueError(f"wgmma_x_order takes 2-byte x [M, K] with K a multiple of 128, unit column stride and an "
                         f"even row stride; got {x.dtype} {tuple(x.shape)} with strides {x.stride()}")
    out = torch.empty(m, k, dtype=x.dtype, device=x.device)
    if m:
        words = x.view(torch.int16).view(torch.int32)  # [M, K / 2] column pairs, row stride x.stride(0) / 2
        x_order_kernel[(m, triton.cdiv(k // 2, BLOCK_WORDS))](words, out.view(torch.int16).view(torch.int32),
                                                              words.stride(0), k // 2, BLOCK=BLOCK_WORDS,
                                                              **launch.triton_options(x.device))
    return out
