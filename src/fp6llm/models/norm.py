"""The decoders' norm modules over a residual stream kept as (x, delta): the add is fused into the norm.

A block's output is not x + f(x) but the pair (x, f(x)); the next norm adds them and normalizes in one kernel
(decoder_ops.add_norm) and hands the sum on as the next residual. Hugging Face's names and tensors: ``weight``
(and ``bias`` for LayerNorm).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..decoder_ops import add_norm


class Norm(nn.Module):
    """RMSNorm (rms=True, Llama family: weight only) or LayerNorm (OPT: weight and bias) of dim features."""

    def __init__(self, dim: int, eps: float, rms: bool):
        super().__init__()
        self.eps, self.rms = eps, rms
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = None if rms else nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, delta: Optional[Tensor] = None, order: bool = False) -> tuple[Tensor, Tensor]:
        """(norm(x + delta), x + delta) for x, delta [..., dim]; delta None: (norm(x), x); order: the norm in the
        wgmma kernel's k order, for an FP6 layer that takes it (nn.ordered_for)."""
        return add_norm(x, delta, self.weight, self.bias, self.eps, self.rms, order)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, {'RMSNorm' if self.rms else 'LayerNorm'}"
