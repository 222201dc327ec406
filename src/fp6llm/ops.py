"""``fpx_linear``: y = x @ dequantize(W).T + bias, as a torch custom op.

The op ``fp6llm::fpx_linear`` has a PyTorch reference implementation (any device) and, on CUDA, the NVRTC-compiled
small-M kernel of kernels/fpx_cuda.py for M <= 16 with per-channel scales (unless the GPU's table measured the
Triton kernel faster for the case: dispatch.small_m_backend), its mid-M kernel at M <= 128 and, on sm_90, its wgmma
kernel where the table measured them fastest, the Triton kernel of kernels/fpx_gemm.py
(when Triton is importable) for the other cases it handles; other CUDA cases de-quantize to x's dtype and call
torch.matmul. A fake implementation gives torch.compile the output's shape and dtype
without running anything.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from .formats import FPFormat
from .quantize import QuantizedWeight

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _as_weight(planes, scales, exp_bits, man_bits, n, k, group_size) -> QuantizedWeight:
    return QuantizedWeight(tuple(planes), scales, FPFormat(exp_bits, man_bits), (n, k), group_size or None)


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reference's product given the de-quantized weight [N, K] (float32): float32 x @ weight.T (+ bias), cast
    to x's dtype. FPxLinear calls it on a CPU with the decoded copy it keeps (nn.py), so that both give equal bits."""
    out = x.float() @ weight.T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def linear_reference(x: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain PyTorch: float32 x @ dequantize(W).T (+ bias), cast to x's dtype; decodes W at every call."""
    return dense_linear(x, qw.dequantize(torch.float32), bias)


@torch.library.custom_op("fp6llm::fpx_linear", mutates_args=())
def fpx_linear_op(x: torch.Tensor, planes: list[torch.Tensor], scales: torch.Tensor, bias: Optional[torch.Tensor],
                  exp_bits: int, man_bits: int, n: int, k: int, group_size: int) -> torch.Tensor:
    """Reference implementation; group_size 0 means per-output-channel scales."""
    return linear_reference(x, _as_weight(planes, scales, exp_bits, man_bits, n, k, group_size), bias)


try:
    from .kernels.fpx_gemm import fpx_gemm, kernel_supports
except ImportError:  # no Triton: the reference serves every device
    fpx_gemm = None
from .kernels import fpx_cuda, launch
from .kernels.dispatch import small_m_backend
from .kernels.wgmma_order import wgmma_x_unorder


def cuda_path(fmt: FPFormat, group_size: int, rows: torch.Tensor, n: int, k: int) -> str:
    """The kernel cuda_linear runs for rows [M, K] (the module docstring's choice): "dense" (de-quantize and
    cuBLAS), "small", "mid" or "wgmma" (fpx_cuda's) or "triton" (fpx_gemm)."""
    if not kernel_supports(fmt, group_size or None, rows.dtype) or rows.numel() == 0:
        return "dense"
    mid = fpx_cuda.mid_supports(fmt, group_size or None, rows, n, k)  # M <= 128
    wgmma = fpx_cuda.wgmma_supports(fmt, group_size or None, rows, n, k)  # sm_90, M <= 4096
    if mid or wgmma:
        backend = small_m_backend(rows.shape[0], n, k, fmt, rows.dtype, rows.device)  # the faster one measured
        if backend == "cuda" and fpx_cuda.supports(fmt, group_size or None, rows, n, k):  # M <= 16
            return "small"
        if backend == "mid" and mid:
            return "mid"
        if backend == "wgmma" and wgmma:
            return "wgmma"
    return "triton"


def cuda_linear(x, planes, scales, bias, exp_bits, man_bits, n, k, group_size, x_ordered: bool = False
                ) -> torch.Tensor:
    """fpx_linear_op's CUDA implementation (the kernel choice of the module docstring: cuda_path); fpx_linear and
    FPxLinear call it without the op in eager mode (launch.direct). x_ordered: x's columns come in the wgmma kernel's
    k order (kernels/wgmma_order.py: a norm, silu_mul or attention wrote them so for this layer,
    nn.FPxLinear.takes_ordered_x), so the wgmma kernel needs no x_order launch; any other kernel gets x back in
    column order first."""
    fmt = _format(exp_bits, man_bits)
    rows = x.reshape(-1, k)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    path = cuda_path(fmt, group_size, rows, n, k)
    if x_ordered and path != "wgmma":
        rows = wgmma_x_unorder(rows)
    shape = (*x.shape[:-1], n)
    if path == "dense":
        weight = _as_weight(planes, scales, exp_bits, man_bits, n, k, group_size).dequantize(x.dtype)
        return torch.nn.functional.linear(rows, weight, bias).view(shape)
    if path == "small":
        return fpx_cuda.fpx_small_m(rows, planes, scales, bias, fmt, n, k).view(shape)
    if path == "mid":
        return fpx_cuda.fpx_mid_m(rows, planes, scales, bias, fmt, n, k).view(shape)
    if path == "wgmma":
        return fpx_cuda.fpx_wgmma(rows, planes, scales, bias, fmt, n, k, x_ordered=x_ordered).view(shape)
    return fpx_gemm(rows, planes, scales, bias, fmt, n, k, group_size or None).view(shape)


@functools.lru_cache(maxsize=None)
def _format(exp_bits: int, man_bits: int) -> FPFormat:
    return FPFormat(exp_bits, man_bits)


if fpx_gemm is not None:
    @fpx_linear_op.register_kernel("cuda")
    def _(x, planes, scales, bias, exp_bits, man_bits, n, k, group_size):
        return cuda_linear(x, planes, scales, bias, exp_bits, man_bits, n, k, group_size)
else:
    cuda_linear = None  # noqa: F811 (no Triton: the op's reference serves CUDA too)


@fpx_linear_op.register_fake
def _(x, planes, scales, bias, exp_bits, man_bits, n, k, group_size):
    return x.new_empty(*x.shape[:-1], n)


def check_linear_args(x: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor]) -> None:
    """The user-facing checks of fpx_linear: raise TypeError/ValueError naming the offending argument."""
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"weight must be a QuantizedWeight, got {type(qw).__name__}")
    if not isinstance(x, torch.Tensor) or x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"x must be a float16/bfloat16/float32 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1 or x.shape[-1] != qw.in_features:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be in_features={qw.in_features}")
    if x.device != qw.device:
        raise ValueError(f"x is on {x.device} but the weight is on {qw.device}")
    if bias is not None and (bias.shape != (qw.out_features,) or bias.device != x.device):
        raise ValueError(f"bias must have shape ({qw.out_features},) on {x.device}, got {tuple(bias.shape)} "
                         f"on {bias.device}")


def fpx_linear(x: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ qw.dequantize().T (+ bias) for x [..., K] of float16/bfloat16/float32; y [..., N] in x's dtype."""
    check_linear_args(x, qw, bias)
    n, k = qw.shape
    linear = cuda_linear if cuda_linear is not None and launch.direct(x, qw.scales, bias) else fpx_linear_op
    return linear(x, list(qw.planes), qw.scales, bias, qw.fmt.exp_bits, qw.fmt.man_bits, n, k, qw.group_size or 0)
