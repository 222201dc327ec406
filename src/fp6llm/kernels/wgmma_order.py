"""The wgmma kernel's k order of x in PyTorch (no Triton needed): within each 128-column tile, logical column
16 ks + 8 h + 2 t + j holds column 32 t + 4 ks + 2 h + j (kernels/x_order.py has the launches and the layout's
reasons). What runs where no kernel writes x in that order: the CPU, torch.compile, a layer handed ordered x that
runs another kernel.
"""

from __future__ import annotations

import torch


def wgmma_x_order_reference(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] (K a multiple of 128) with each 128-column tile's columns in the wgmma kernel's k order; a copy."""
    *lead, k = _width(x)
    return x.reshape(x.numel() // k, k // 128, 4, 8, 2, 2).permute(0, 1, 3, 4, 2, 5).reshape(*lead, k)


def wgmma_x_unorder(x: torch.Tensor) -> torch.Tensor:
    """The inverse of wgmma_x_order_reference: x [..., K] in the wgmma kernel's k order back in column order; a copy
    (what a layer handed ordered x does where it runs another kernel than the wgmma one)."""
    *lead, k = _width(x)
    return x.reshape(x.numel() // k, k // 128, 8, 2, 4, 2).permute(0, 1, 4, 2, 3, 5).reshape(*lead, k)


def _width(x: torch.Tensor) -> torch.Size:
    if x.dim() < 1 or x.shape[-1] % 128 or not x.shape[-1]:
        raise ValueError(f"x in the wgmma kernel's k order has whole 128-column tiles: its last dimension must be a "
                         f"positive multiple of 128, got shape {tuple(x.shape)}")
    return x.shape
