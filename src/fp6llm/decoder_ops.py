"""The decoders' small fused steps as torch custom ops: residual add + RMSNorm / LayerNorm, RoPE, silu(gate) * up.

Each op has a PyTorch reference (any device; what runs on the CPU) and, on CUDA, one Triton kernel launch
(kernels/norm.py, kernels/rotary.py, kernels/activation.py), plus a fake implementation for torch.compile, as
ops.py does for fpx_linear. At decode a Llama block then launches: add + norm, qkv GEMM, rotary (q and k), the
cache write and attention, o GEMM, add + norm, gate_up GEMM, silu_mul, down GEMM. add_norm and silu_mul take
order=True to write their output in the wgmma kernel's k order for an FP6 layer that runs it (models/llama.py).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels import launch
from .kernels.wgmma_order import wgmma_x_order_reference

try:
    from .kernels import activation, norm, rotary as rotary_kernels
except ImportError:  # no Triton: the references serve every device
    activation = norm = rotary_kernels = None


# ---- PyTorch references (what runs on the CPU) ----------------------------------------------------------------------

def add_norm_reference(x: Tensor, delta: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], eps: float,
                       rms: bool) -> tuple[Tensor, Tensor]:
    """Plain PyTorch of kernels/norm.py: the sum in x's dtype, the statistics in float32."""
    total = x if delta is None else x + delta
    t32 = total.float()
    if rms:
        normed = (t32 * torch.rsqrt(t32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        return (normed.float() * weight.float()).to(x.dtype), total
    out = F.layer_norm(t32, (x.shape[-1],), weight.float(), None if bias is None else bias.float(), eps)
    return out.to(x.dtype), total


def rotary_reference(x: Tensor, positions: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Plain PyTorch of kernels/rotary.py: float32 rotation, rounded once to x's dtype."""
    cos, sin = cos[positions][:, :, None], sin[positions][:, :, None]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def silu_mul_reference(gate_up: Tensor) -> Tensor:
    """Plain PyTorch of kernels/activation.py."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def check_rotary_args(x: Tensor, positions: Tensor, cos: Tensor, sin: Tensor) -> None:
    """ValueError naming the argument unless the shapes and dtypes are those of kernels/rotary.py."""
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


# ---- the custom ops -------------------------------------------------------------------------------------------------

@torch.library.custom_op("fp6llm::add_norm", mutates_args=())
def add_norm_op(x: Tensor, delta: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, rms: bool
                ) -> tuple[Tensor, Tensor]:
    return add_norm_reference(x, delta, weight, bias, eps, rms)


if norm is not None:
    @add_norm_op.register_kernel("cuda")
    def _(x, delta, weight, bias, eps, rms):
        return norm.add_norm(x, delta, weight, bias, eps, rms)


@add_norm_op.register_fake
def _(x, delta, weight, bias, eps, rms):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("fp6llm::norm", mutates_args=())
def norm_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, rms: bool) -> Tensor:
    return add_norm_reference(x, None, weight, bias, eps, rms)[0]


if norm is not None:
    @norm_op.register_kernel("cuda")
    def _(x, weight, bias, eps, rms):
        return norm.add_norm(x, None, weight, bias, eps, rms)[0]


@norm_op.register_fake
def _(x, weight, bias, eps, rms):
    return torch.empty_like(x)


def add_norm(x: Tensor, delta: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], eps: float, rms: bool,
             order: bool = False) -> tuple[Tensor, Tensor]:
    """(norm(x + delta), x + delta), or (norm(x), x) without delta. x, delta [..., D]; weight, bias [D].

    rms: RMSNorm (weight only, as Llama) or LayerNorm (weight and bias, as OPT). The sum is in x's dtype, the
    statistics in float32 (kernels/norm.py). order: the norm's columns in the wgmma kernel's k order
    (kernels/wgmma_order.py; D a multiple of 128), for an FP6 layer that takes x so (nn.FPxLinear.takes_ordered_x).
    In eager mode on CUDA the kernel is called without the op's dispatch (launch.direct), and writes that order.
    """
    if order and x.shape[-1] % 128:
        raise ValueError(f"the norm in the wgmma kernel's k order needs D a multiple of 128, got {x.shape[-1]}")
    if norm is not None and launch.direct(x, delta, weight, bias):
        return norm.add_norm(x, delta, weight, bias, eps, rms, order)  # (norm(x), x) without delta, as below
    if delta is None:
        out, total = norm_op(x, weight, bias, eps, rms), x
    else:
        out, total = add_norm_op(x, delta, weight, bias, eps, rms)
    return (wgmma_x_order_reference(out) if order else out), total


@torch.library.custom_op("fp6llm::rotary", mutates_args=())
def rotary_op(x: Tensor, positions: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return rotary_reference(x, positions, cos, sin)


if rotary_kernels is not None:
    @rotary_op.register_kernel("cuda")
    def _(x, positions, cos, sin):
        return rotary_kernels.rotary(x, positions, cos, sin)


@rotary_op.register_fake
def _(x, positions, cos, sin):
    return x.new_empty(x.shape)


def rotary(x: Tensor, positions: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, T, H, D] rotated by the angles of positions [B, T] in the table cos, sin [S, D/2] (kernels/rotary.py).

    Returns a new contiguous tensor. Raises ValueError for shapes or dtypes other than those.
    """
    check_rotary_args(x, positions, cos, sin)
    if rotary_kernels is not None and launch.direct(x, positions, cos, sin):
        return rotary_kernels.rotary(x, positions, cos, sin)
    return rotary_op(x, positions, cos, sin)


@torch.library.custom_op("fp6llm::silu_mul", mutates_args=())
def silu_mul_op(gate_up: Tensor) -> Tensor:
    return silu_mul_reference(gate_up).contiguous()


if activation is not None:
    @silu_mul_op.register_kernel("cuda")
    def _(gate_up):
        return activation.silu_mul(gate_up)


@silu_mul_op.register_fake
def _(gate_up):
    return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


def silu_mul(gate_up: Tensor, order: bool = False) -> Tensor:
    """silu(gate) * up of the fused gate_up projection's output [..., 2 I] -> [..., I] (kernels/activation.py);
    order: in the wgmma kernel's k order (I a multiple of 128), as add_norm's."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up must have an even last dimension (gate | up), got {tuple(gate_up.shape)}")
    if order and gate_up.shape[-1] // 2 % 128:
        raise ValueError(f"silu_mul in the wgmma kernel's k order needs I a multiple of 128, got "
                         f"{gate_up.shape[-1] // 2}")
    if activation is not None and launch.direct(gate_up):
        return activation.silu_mul(gate_up, order)
    out = silu_mul_op(gate_up)
    return wgmma_x_order_reference(out) if order else out
