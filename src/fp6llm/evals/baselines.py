"""Weight quantizers to compare against, as fake quantization (quantize, then de-quantize to float32).

Every method is a ``Method`` value: a name the CLI parses ("e2m3", "e3m2:g64", "e2m3:g32:mse", "mxfp6_e2m3",
"int8", "int4:g128", "nf4:g64"), ``fake_quantize(w) -> w'`` and the bits it stores per weight, scales included.
The FPx and MX methods run fp6llm's own quantize_weight (the codes and scales the kernel reads); the integer and
NF4 baselines are plain PyTorch, computed here only to be compared with (no kernel reads them):

- intB RTN: asymmetric round-to-nearest per group (or per output channel), a float16 scale and a float16 zero
  point per group: B + 32 / group bits per weight.
- NF4 (QLoRA's NormalFloat): the 16 NF4 levels times each group's absmax (float16): 4 + 16 / group bits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from ..formats import FPFormat, MXFormat
from ..quantize import SCALE_SEARCHES, fake_quantize

# QLoRA's NF4 code book (bitsandbytes' values): quantiles of N(0, 1) scaled to [-1, 1], with an exact zero.
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044006, 0.5626170039176941,
              0.7229568362236023, 1.0)
HALF_BITS = 16
KINDS = ("fpx", "mx", "int", "nf4")


@dataclass(frozen=True)
class Method:
    """One way to quantize a weight. kind: fpx | mx | int | nf4; fmt: FPFormat (fpx), MXFormat (mx), int bits."""

    kind: str
    fmt: object
    group_size: Optional[int] = None
    scale_search: Optional[str] = None

    @classmethod
    def parse(cls, text: str) -> "Method":
        """"e2m3", "e3m2:g64", "e2m3:g32:mse", "mxfp6_e2m3", "int8", "int4:g128", "nf4:g64" (case-insensitive).

        Raises ValueError naming the part that is not understood.
        """
        if isinstance(text, Method):
            return text
        parts = [p.strip().lower() for p in str(text).split(":")]
        head, group_size, scale_search = parts[0], None, None
        for part in parts[1:]:
            if re.fullmatch(r"g\d+", part) and int(part[1:]) > 0:
                group_size = int(part[1:])
            elif part in SCALE_SEARCHES:
                scale_search = part
            else:
                raise ValueError(f"method {text!r}: {part!r} is neither a group size (g32, g64, ...) nor a scale "
                                 f"search ({', '.join(SCALE_SEARCHES)})")
        if head.startswith("mx"):
            if group_size is not None:
                raise ValueError(f"method {text!r}: MX formats have a fixed block of 32, drop {':g' + str(group_size)}")
            return cls("mx", MXFormat.parse(head), None, scale_search)
        match = re.fullmatch(r"int(\d)", head)
        if match:
            bits = int(match.group(1))
            if not 2 <= bits <= 8 or scale_search:
                raise ValueError(f"method {text!r}: intB needs 2 <= B <= 8 and no scale search")
            return cls("int", bits, group_size)
        if head == "nf4":
            if group_size is None or scale_search:
                raise ValueError(f"method {text!r}: NF4 needs a group size (nf4:g64) and no scale search")
            return cls("nf4", 4, group_size)
        return cls("fpx", FPFormat.parse(head), group_size, scale_search)

    @property
    def name(self) -> str:
        head = {"fpx": lambda f: f.name, "mx": lambda f: f.name, "int": lambda b: f"int{b}",
                "nf4": lambda b: "nf4"}[self.kind](self.fmt)
        return ":".join([head] + ([f"g{self.group_size}"] if self.group_size else [])
                        + ([self.scale_search] if self.scale_search else []))

    @property
    def element_bits(self) -> int:
        return {"fpx": lambda f: f.bits, "mx": lambda f: f.element.bits}.get(self.kind, lambda b: b)(self.fmt)

    def bits_per_weight(self, k: int) -> float:
        """Stored bits per weight of a row of K weights, scales (and zero points) included."""
        if self.kind == "mx":
            return self.element_bits + self.fmt.scale_bits / self.fmt.block_size
        group = self.group_size or k
        scale_bits = {"fpx": HALF_BITS if self.group_size else 32, "int": 2 * HALF_BITS, "nf4": HALF_BITS}[self.kind]
        return self.element_bits + scale_bits / group

    def fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        """The de-quantized weight [N, K] (float32) that this method would store for ``w``."""
        if self.kind in ("fpx", "mx"):
            return fake_quantize(w, self.fmt, self.group_size, self.scale_search)
        if self.group_size is not None and w.shape[1] % self.group_size:
            raise ValueError(f"group size {self.group_size} does not divide K={w.shape[1]}")
        groups = w.float().reshape(w.shape[0], -1, self.group_size or w.shape[1])
        out = int_rtn(groups, self.fmt) if self.kind == "int" else nf4(groups)
        return out.reshape(w.shape)


def int_rtn(groups: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric RTN over the last dimension: levels 0 .. 2^bits - 1 between each group's min and max."""
    low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
    scale = ((high - low) / (2**bits - 1)).clamp(min=1e-12).half().float()
    zero = torch.round(-low / scale).clamp(0, 2**bits - 1).half().float()
    codes = torch.clamp(torch.round(groups / scale) + zero, 0, 2**bits - 1)
    return (codes - zero) * scale


def nf4(groups: torch.Tensor) -> torch.Tensor:
    """The nearest NF4 level times each group's absmax (float16), over the last dimension."""
    absmax = groups.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12).half().float()
    levels = torch.tensor(NF4_LEVELS)
    index = torch.argmin((groups.unsqueeze(-1) / absmax.unsqueeze(-1) - levels).abs(), dim=-1)
    return levels[index] * absmax
