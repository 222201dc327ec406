"""FPxLinear (an nn.Module over a QuantizedWeight) and quantize_model (swap every nn.Linear in place).

On a CPU the custom op's reference path would decode every weight at every call (about 1 s per decode step of
the 10M-parameter embedded model on 2 cores). So an FPxLinear on a CPU decodes its weight once, at its first
forward, and keeps the float32 copy (32 / bits times the packed bytes: 5.3x for FP6) while memory allows: only if
the machine would still have DECODED_RESERVE of its memory available after it (Linux's MemAvailable; elsewhere it
keeps none). The copy is dropped when the module moves or is cast, and re-made when its planes or scales change.
On CUDA nothing is kept: the kernel de-quantizes in registers.
"""

from __future__ import annotations

import fnmatch
import os
from typing import Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .formats import FPFormat
from .kernels import launch
from .kernels.wgmma_order import wgmma_x_unorder
from .ops import ACTIVATION_DTYPES, check_linear_args, cuda_linear, cuda_path, dense_linear, fpx_linear
from .quantize import QuantizedWeight, quantize_weight

DECODED_RESERVE = 0.25  # a CPU layer keeps a decoded copy only if this fraction of the memory stays available
# x written in the wgmma kernel's k order for the layers that run it (takes_ordered_x); FP6LLM_ORDER_X=0 turns it
# off: an A/B switch until the device has timed it end to end (built 2026-12-04)
ORDER_X = os.environ.get("FP6LLM_ORDER_X", "1") != "0"
MEMINFO = "/proc/meminfo"


def available_memory() -> "tuple[int, int] | None":
    """(available, total) bytes of this machine's memory from /proc/meminfo; None where there is none."""
    try:
        with open(MEMINFO) as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024, int(fields["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def ordered_for(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``layer`` (any module: only an FPxLinear says yes) takes its input for the rows of x in the wgmma
    kernel's k order (FPxLinear.takes_ordered_x)."""
    return isinstance(layer, FPxLinear) and layer.takes_ordered_x(x)


def _version(tensor: torch.Tensor) -> int:
    """The in-place modification counter of a tensor (-1 for an inference tensor, which has none)."""
    try:
        return tensor._version
    except RuntimeError:
        return -1


class FPxLinear(nn.Module):
    """A linear layer whose weight is stored as pre-packed FPx codes + scales.

    The planes, scales and bias are buffers, so ``.to(device)`` and ``state_dict()`` carry them.
    """

    def __init__(self, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.fmt = qw.fmt
        self.in_features, self.out_features = qw.in_features, qw.out_features
        self.group_size = qw.group_size
        self.num_planes = len(qw.planes)
        for i, plane in enumerate(qw.planes):
            self.register_buffer(f"plane{i}", plane)
        self.register_buffer("scales", qw.scales)
        self.register_buffer("bias", bias)
        self._decoded = None  # (key of the planes and scales it was decoded from, float32 weight) on a CPU
        self._takes_ordered: dict = {}  # takes_ordered_x's answers by (rows, dtype, device)

    @property
    def weight(self) -> QuantizedWeight:
        planes = tuple(getattr(self, f"plane{i}") for i in range(self.num_planes))
        return QuantizedWeight(planes, self.scales, self.fmt, (self.out_features, self.in_features), self.group_size)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: "str | FPFormat" = "e3m2", group_size: Optional[int] = None
                    ) -> "FPxLinear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(quantize_weight(linear.weight.detach(), fmt, group_size), bias)

    def _apply(self, fn, recurse=True):
        # A dtype cast of the model (model.half(), model.to(torch.bfloat16)) casts floating-point buffers; the
        # scales are part of the quantized weight and keep their dtype (bfloat16 scales are not even valid).
        scales = self.scales
        self._decoded = None
        super()._apply(fn, recurse)
        if self.scales.dtype != scales.dtype:
            self.scales = scales.to(self.scales.device)  # the original values, not a round trip through fn's dtype
        return self

    def forward(self, x: torch.Tensor, x_ordered: bool = False) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features]. x_ordered: x's columns come in the wgmma kernel's k order
        (kernels/wgmma_order.py), as decoder_ops.add_norm / silu_mul and attention write them with order=True
        where takes_ordered_x said so; any path but the wgmma kernel's puts them back first."""
        bias = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        if (cuda_linear is not None and launch.direct(x, self.scales) and x.dtype in ACTIVATION_DTYPES
                and x.dim() >= 1 and x.shape[-1] == self.in_features and x.device == self.scales.device):
            # eager on CUDA: the kernel without the custom op's dispatch and the QuantizedWeight's checks (the
            # buffers are the layer's own, checked when it was built); anything else goes through fpx_linear
            planes = [getattr(self, f"plane{i}") for i in range(self.num_planes)]
            return cuda_linear(x, planes, self.scales, bias, self.fmt.exp_bits, self.fmt.man_bits, self.out_features,
                               self.in_features, self.group_size or 0, x_ordered)
        if x_ordered:
            x = wgmma_x_unorder(x)
        if self.scales.device.type == "cpu" and not torch.compiler.is_compiling():
            weight = self.decoded_weight()
            if weight is not None:
                check_linear_args(x, self.weight, bias)
                return dense_linear(x, weight, bias)
        return fpx_linear(x, self.weight, bias)

    def takes_ordered_x(self, x: torch.Tensor) -> bool:
        """Whether forward would run the wgmma kernel for the rows of x (an activation of this layer's batch: its
        leading shape, dtype and device; any last dimension), so that whoever writes its input may write it in that
        kernel's k order (forward's x_ordered) and spare the kernel its x_order launch: eager on CUDA, in_features a
        multiple of 128, and ops.cuda_path's choice. A wrong answer costs time, not results: forward puts x back."""
        if not ORDER_X or cuda_linear is None or self.in_features % 128 or not launch.direct(x, self.scales) \
                or x.dtype not in ACTIVATION_DTYPES or x.dim() < 1 or x.device != self.scales.device:
            return False
        key = (x.numel() // max(1, x.shape[-1]), x.dtype, x.device)
        answers = self.__dict__.setdefault("_takes_ordered", {})  # (a layer unpickled from before it had them)
        if key not in answers:  # once per batch shape: an eager prefill would pay the choice at every call
            # [M, in_features] rows with a fresh tensor's dtype, device, unit column stride and alignment, as the
            # norm's output will have (what ops.cuda_path reads of them), without M rows of memory
            rows = x.new_empty(1, self.in_features).expand(key[0], -1)
            answers[key] = cuda_path(self.fmt, self.group_size or 0, rows, self.out_features,
                                     self.in_features) == "wgmma"
        return answers[key]

    def decoded_weight(self) -> "torch.Tensor | None":
        """The float32 weight [N, K] that a CPU layer keeps (see the module's docstring), decoded on first use;
        None when memory does not allow the copy."""
        tensors = [getattr(self, f"plane{i}") for i in range(self.num_planes)] + [self.scales]
        key = tuple((t.data_ptr(), _version(t)) for t in tensors)
        if self._decoded is not None and self._decoded[0] == key:
            return self._decoded[1]
        self._decoded = None
        memory = available_memory()
        needed = self.out_features * self.in_features * 4
        if memory is None or memory[0] - needed < DECODED_RESERVE * memory[1]:
            return None
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable inside and outside
            weight = self.weight.dequantize(torch.float32)
        self._decoded = (key, weight)
        return weight

    def extra_repr(self) -> str:
        grouping = "per-channel" if self.group_size is None else f"group_size={self.group_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt.name}, {grouping}"


def _skipped(name: str, skip: Iterable[str]) -> bool:
    """A pattern matches the full dotted name, its last part, or (fnmatch) either."""
    last = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(last, pattern) for pattern in skip)


def quantize_model(model: nn.Module, fmt: "str | FPFormat" = "e3m2", group_size: Optional[int] = None,
                   skip: Iterable[str] = ("lm_head",), progress: bool = True) -> nn.Module:
    """Replace every nn.Linear of ``model`` whose name does not match ``skip`` by an FPxLinear, in place.

    Returns the model. Each layer is quantized on the device where its weight lives.
    """
    fmt = FPFormat.parse(fmt)
    if isinstance(model, nn.Linear):
        raise TypeError("quantize_model swaps the layers inside a model and cannot replace the model itself, an "
                        "nn.Linear: use FPxLinear.from_linear(layer)")
    if isinstance(skip, str):
        skip = (skip,)
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and not _skipped(name, skip)]
    for name, linear in tqdm(targets, desc=f"quantize {fmt.name}", unit="layer", disable=not progress):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FPxLinear.from_linear(linear, fmt, group_size))
    return model
