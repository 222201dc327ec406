"""Weight-only quantization: scales + pre-packed bit planes (QuantizedWeight)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import FPFormat, MXFormat, decode, encode, mx_exponents, parse_weight_format
from .packing import LAYOUT_VERSION, pack, plane_shape, plane_widths, unpack

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP16_MIN_NORMAL = torch.finfo(torch.float16).tiny
FP16_MAX = torch.finfo(torch.float16).max
ROWS_PER_CHUNK = 4096  # rows encoded at a time: bounds the temporaries of a large weight
# scale_search="mse": each group's scale is absmax / max_value times the ratio of CLIP_RATIOS (1 = no clipping)
# whose codes give the least squared weight error; 1.0 comes first, so a tie keeps the absmax scale.
SCALE_SEARCHES = ("mse",)
CLIP_RATIOS = tuple(1.0 - 0.02 * i for i in range(11))  # 1.00, 0.98, ..., 0.80
MX_EXPONENT_STEPS = (0, -1, 1)  # scale_search="mse" for MX: the OCP exponent, one lower (clips more), one higher


@dataclass
class QuantizedWeight:
    """A weight [N, K] as per-row (or per-group) scales and bit planes of ``fmt`` codes.

    planes: tuple of int32 plane_shape(N, K, w) = [N_pad / 16, K_pad / 128, 64 w], layout version 2 of packing.py
    (docs/layout.md).
    scales: [N] (per output channel) or [N, K / group_size], float32 or float16; weight ~= decode(code) * scale.
    """

    planes: tuple
    scales: torch.Tensor
    fmt: FPFormat
    shape: tuple
    group_size: "int | None" = None
    layout_version: int = LAYOUT_VERSION

    def __post_init__(self):
        self.fmt = FPFormat.parse(self.fmt)
        self.planes = tuple(self.planes)
        self.shape = tuple(int(s) for s in self.shape)
        n, k = self.shape
        widths = plane_widths(self.fmt.bits)
        if len(self.planes) != len(widths):
            raise ValueError(f"{self.fmt.name} needs {len(widths)} planes, got {len(self.planes)}")
        for width, plane in zip(widths, self.planes):
            expected = plane_shape(n, k, width)
            if plane.dtype != torch.int32 or tuple(plane.shape) != expected:
                raise ValueError(
                    f"{width}-bit plane of a {n}x{k} {self.fmt.name} weight must be int32 {expected}, "
                    f"got {plane.dtype} {tuple(plane.shape)}"
                )
        expected = (n,) if self.group_size is None else (n, k // self.group_size)
        if tuple(self.scales.shape) != expected or self.scales.dtype not in (torch.float32, torch.float16):
            raise ValueError(f"scales must be float32/float16 {expected}, got {self.scales.dtype} "
                             f"{tuple(self.scales.shape)}")
        if self.layout_version != LAYOUT_VERSION:
            raise ValueError(f"packed layout version {self.layout_version} is not the supported {LAYOUT_VERSION}")

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.scales.device

    @property
    def nbytes(self) -> int:
        """Bytes of packed planes + scales (what the weight costs in memory)."""
        return sum(p.numel() * p.element_size() for p in self.planes) + self.scales.numel() * self.scales.element_size()

    def codes(self) -> torch.Tensor:
        """uint8 codes [N, K]."""
        return unpack(self.planes, self.fmt, self.in_features, self.out_features)

    def expanded_scales(self) -> torch.Tensor:
        """float32 scale of every weight element's column: [N, 1] or [N, K]."""
        scales = self.scales.float()
        if self.group_size is None:
            return scales[:, None]
        return scales.repeat_interleave(self.group_size, dim=1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as [N, K] of ``dtype``: decode(code) * scale, computed in float32."""
        return (decode(self.codes(), self.fmt) * self.expanded_scales()).to(dtype)

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(tuple(p.to(device) for p in self.planes), self.scales.to(device), self.fmt,
                               self.shape, self.group_size, self.layout_version)


def _choose_scales(absmax: torch.Tensor, fmt: FPFormat, grouped: bool) -> torch.Tensor:
    """absmax / max_value, never zero; float16 for group scales when every one fits, else float32.

    A scale rounded to float16 is rounded up, so absmax / scale never exceeds max_value (no saturation error).
    """
    scales = absmax / fmt.max_value
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    if not grouped or float(scales.min()) < FP16_MIN_NORMAL or float(scales.max()) > FP16_MAX / 2:
        return scales
    half = scales.to(torch.float16)
    return torch.where(half.float() < scales, torch.nextafter(half, torch.full_like(half, float("inf"))), half)


def _check_scale_search(scale_search: "str | None") -> None:
    if scale_search is not None and scale_search not in SCALE_SEARCHES:
        raise ValueError(f"scale_search must be None (absmax scales) or one of {', '.join(SCALE_SEARCHES)}, got "
                         f"{scale_search!r}")


def _encode_best(groups: torch.Tensor, candidates, fmt: FPFormat) -> tuple:
    """(codes [n, G, g], scales [n, G]) of the candidate scales with the least squared error in each group.

    groups: float32 [n, G, g]; candidates: a list of scales [n, G] (float32 or float16); the first wins ties. The
    scales are float16 only if every candidate's are.
    """
    if len(candidates) == 1:
        return encode(groups / candidates[0][:, :, None].float(), fmt), candidates[0]
    best_codes = best_scales = best_error = None
    for scales in candidates:
        codes = encode(groups / scales[:, :, None].float(), fmt)
        error = (decode(codes, fmt) * scales[:, :, None].float() - groups).square().sum(dim=2)
        if best_codes is None:
            best_codes, best_scales, best_error = codes, scales, error
            continue
        better = error < best_error
        best_codes = torch.where(better[:, :, None], codes, best_codes)
        best_scales, best_error = torch.where(better, scales, best_scales), torch.where(better, error, best_error)
    return best_codes, best_scales


def quantize_weight(w: torch.Tensor, fmt: "str | FPFormat | MXFormat" = "e3m2", group_size: "int | None" = None,
                    absmax: "torch.Tensor | None" = None, scale_search: "str | None" = None) -> QuantizedWeight:
    """Quantize a weight [N, K] (out_features, in_features) of float32/float16/bfloat16.

    Per-output-channel scales by default (each row's absmax maps to fmt.max_value); with ``group_size`` one scale
    per group of that many input columns. ``absmax`` [N] (per-channel scales only): each row's largest |value| to
    scale by instead of w's own, so that w, a column slice of a larger weight (a tensor-parallel shard), gets the
    codes and scales of that weight's columns.
    fmt an MXFormat (or its name, "mxfp6_e2m3", ...): OCP MX, one power-of-two float32 scale 2^X per 32 columns
    (fmt.block_size), X as fp6llm.formats.mx_exponents computes it; the result is a group-32 QuantizedWeight of the
    element format, read by the same kernels. scale_search "mse": per group (row), the scale among CLIP_RATIOS of
    the absmax one (MX: the exponents MX_EXPONENT_STEPS around the OCP one) with the least squared weight error;
    None (default) keeps the absmax scale.
    Raises ValueError for a non-2-D weight, a group size that does not divide K (or is not 32 for MX), an absmax
    of another shape or with group_size, an unknown scale_search, or NaN/Inf (naming the first bad row); TypeError
    for a non-float weight.
    """
    codes, scales, fmt, group_size = _codes_and_scales(w, fmt, group_size, absmax, scale_search)
    return QuantizedWeight(pack(codes, fmt), scales, fmt, tuple(w.shape), group_size)


def fake_quantize(w: torch.Tensor, fmt: "str | FPFormat | MXFormat" = "e3m2", group_size: "int | None" = None,
                  scale_search: "str | None" = None) -> torch.Tensor:
    """quantize_weight(w, ...).dequantize() (float32 [N, K], the same values) without packing the planes: for
    quality measurements that swap weights many times. Raises what quantize_weight raises."""
    codes, scales, fmt, group_size = _codes_and_scales(w, fmt, group_size, None, scale_search)
    scales = scales.float()[:, None] if group_size is None else scales.float().repeat_interleave(group_size, dim=1)
    return decode(codes, fmt) * scales


def _codes_and_scales(w, fmt, group_size, absmax, scale_search) -> tuple:
    """(uint8 codes [N, K], scales, element FPFormat, group size) for quantize_weight (its checks included)."""
    fmt = parse_weight_format(fmt)
    _check_scale_search(scale_search)
    mx = isinstance(fmt, MXFormat)
    if mx:
        if group_size not in (None, fmt.block_size) or absmax is not None:
            raise ValueError(f"{fmt.name} has one scale per {fmt.block_size} columns: group_size must be None or "
                             f"{fmt.block_size} and absmax None, got {group_size!r} and "
                             f"{'a tensor' if absmax is not None else None}")
        group_size, fmt, mx_format = fmt.block_size, fmt.element, fmt
    if not isinstance(w, torch.Tensor) or w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight must be a float32/float16/bfloat16 tensor, got "
                        f"{getattr(w, 'dtype', type(w).__name__)}")
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(w.shape)}")
    n, k = w.shape
    if group_size is not None:
        if not isinstance(group_size, int) or group_size <= 0 or k % group_size:
            raise ValueError(f"group_size {group_size!r} must be a positive int dividing in_features K={k}")
    if absmax is not None and (group_size is not None or tuple(absmax.shape) != (n,)):
        raise ValueError(f"absmax must be [{n}] with per-channel scales (no group_size), got shape "
                         f"{tuple(absmax.shape)} and group_size {group_size}")
    bad_rows = (~torch.isfinite(w)).any(dim=1)
    if bool(bad_rows.any()):
        row = int(torch.nonzero(bad_rows)[0])
        raise ValueError(f"weight has NaN/Inf in {int(bad_rows.sum())} row(s), the first is row {row}")

    groups = w.float().view(n, -1, group_size or k)
    absmax = groups.abs().amax(dim=2) if absmax is None else absmax.float().view(n, 1)
    grouped = group_size is not None
    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    scales = torch.empty(absmax.shape, dtype=torch.float32, device=w.device)
    all_half = True
    for start in range(0, n, ROWS_PER_CHUNK):
        rows = slice(start, start + ROWS_PER_CHUNK)
        if mx:
            exponents = mx_exponents(absmax[rows], mx_format)
            steps = MX_EXPONENT_STEPS if scale_search else MX_EXPONENT_STEPS[:1]
            candidates = [torch.ldexp(torch.ones_like(absmax[rows]), (exponents + step).clamp(-127, 127))
                          for step in steps]
        else:
            ratios = CLIP_RATIOS if scale_search else CLIP_RATIOS[:1]
            candidates = [_choose_scales(absmax[rows] * ratio, fmt, grouped) for ratio in ratios]
        chunk_codes, chunk_scales = _encode_best(groups[rows], candidates, fmt)
        codes[rows], scales[rows] = chunk_codes.view(-1, k), chunk_scales.float()
        all_half = all_half and chunk_scales.dtype == torch.float16
    if all_half:  # every chunk chose float16 scales (_choose_scales: group scales that all fit)
        scales = scales.half()
    if group_size is None:
        scales = scales[:, 0]
    return codes, scales.contiguous(), fmt, group_size
