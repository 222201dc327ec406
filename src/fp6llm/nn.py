"""FPxLinear (an nn.Module over a QuantizedWeight) and quantize_model (swap every nn.Linear in place)."""

from __future__ import annotations

import fnmatch
from typing import Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .formats import FPFormat
from .ops import fpx_linear
from .quantize import QuantizedWeight, quantize_weight


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
        super()._apply(fn, recurse)
        if self.scales.dtype != scales.dtype:
            self.scales = scales.to(self.scales.device)  # the original values, not a round trip through fn's dtype
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return fpx_linear(x, self.weight, bias)

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
