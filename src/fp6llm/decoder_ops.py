"""The decoders' small fused steps as torch custom ops: residual add + RMSNorm / LayerNorm, RoPE, silu(gate) * up.

Each op has a PyTorch reference (any device; what runs on the CPU) and, on CUDA, one Triton kernel launch
(kernels/norm.py, kernels/rotary.py, kernels/activation.py), plus a fake implementation for torch.compile, as
ops.py does for fpx_linear. At decode a Llama block then launches: add + norm, qkv GEMM, rotary (q and k), the
cache write and attention, o GEMM, add + norm, gate_up GEMM, silu_mul, down GEMM.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .kernels.activation import silu_mul as silu_mul_kernel
from .kernels.activation import silu_mul_reference
from .kernels.norm import add_norm as add_norm_kernel
from .kernels.norm import add_norm_reference
from .kernels.rotary import check_rotary_args, rotary_reference
from .kernels.rotary import rotary as rotary_kernel


@torch.library.custom_op("fp6llm::add_norm", mutates_args=())
def add_norm_op(x: Tensor, delta: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, rms: bool
                ) -> tuple[Tensor, Tensor]:
    return add_norm_reference(x, delta, weight, bias, eps, rms)


@add_norm_op.register_kernel("cuda")
def _(x, delta, weight, bias, eps, rms):
    return add_norm_kernel(x, delta, weight, bias, eps, rms)


@add_norm_op.register_fake
def _(x, delta, weight, bias, eps, rms):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("fp6llm::norm", mutates_args=())
def norm_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, rms: bool) -> Tensor:
    return add_norm_reference(x, None, weight, bias, eps, rms)[0]


@norm_op.register_kernel("cuda")
def _(x, weight, bias, eps, rms):
    return add_norm_kernel(x, None, weight, bias, eps, rms)[0]


@norm_op.register_fake
def _(x, weight, bias, eps, rms):
    return torch.empty_like(x)


def add_norm(x: Tensor, delta: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], eps: float, rms: bool
             ) -> tuple[Tensor, Tensor]:
    """(norm(x + delta), x + delta), or (norm(x), x) without delta. x, delta [..., D]; weight, bias [D].

    rms: RMSNorm (weight only, as Llama) or LayerNorm (weight and bias, as OPT). The sum is in x's dtype, the
    statistics in float32 (kernels/norm.py).
    """
    if delta is None:
        return norm_op(x, weight, bias, eps, rms), x
    return add_norm_op(x, delta, weight, bias, eps, rms)


@torch.library.custom_op("fp6llm::rotary", mutates_args=())
def rotary_op(x: Tensor, positions: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return rotary_reference(x, positions, cos, sin)


@rotary_op.register_kernel("cuda")
def _(x, positions, cos, sin):
    return rotary_kernel(x, positions, cos, sin)


@rotary_op.register_fake
def _(x, positions, cos, sin):
    return x.new_empty(x.shape)


def rotary(x: Tensor, positions: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, T, H, D] rotated by the angles of positions [B, T] in the table cos, sin [S, D/2] (kernels/rotary.py).

    Returns a new contiguous tensor. Raises ValueError for shapes or dtypes other than those.
    """
    check_rotary_args(x, positions, cos, sin)
    return rotary_op(x, positions, cos, sin)


@torch.library.custom_op("fp6llm::silu_mul", mutates_args=())
def silu_mul_op(gate_up: Tensor) -> Tensor:
    return silu_mul_reference(gate_up).contiguous()


@silu_mul_op.register_kernel("cuda")
def _(gate_up):
    return silu_mul_kernel(gate_up)


@silu_mul_op.register_fake
def _(gate_up):
    return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


def silu_mul(gate_up: Tensor) -> Tensor:
    """silu(gate) * up of the fused gate_up projection's output [..., 2 I] -> [..., I] (kernels/activation.py)."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up must have an even last dimension (gate | up), got {tuple(gate_up.shape)}")
    return silu_mul_op(gate_up)
