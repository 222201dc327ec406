"""Ahead-of-time bit-plane pre-packing: the one place that knows the packed weight layout (docs/layout.md).

A weight of N x K codes of b bits is split into bit planes of power-of-two widths (6 = 4 + 2, 5 = 4 + 1, ...).
Plane 0 holds the code's top bits (the sign first), the last plane its lowest bits. Each plane is an int32 tensor
[N, K_pad * w / 32]: row n's words are contiguous, word j holds the w-bit fields of the 32 / w consecutive columns
k = j * 32/w ... (j+1) * 32/w - 1. Inside a word, even columns fill the low 16 bits and odd columns the high 16
bits, each half in column order, w bits per field:

    column r of the word (r = k mod 32/w):  bit offset = 16 * (r mod 2) + w * (r // 2)

so one shift and one mask put the fields of columns (k, k + 1) into the two 16-bit halves of a register, ready to
become an fp16x2 / bf16x2 pair (the kernel's SIMD-in-a-register de-quantization). K is padded with zero codes to a
multiple of K_ALIGN; N is not padded.
"""

from __future__ import annotations

import torch

LAYOUT_VERSION = 1
WORD_BITS = 32
ROWS_PER_CHUNK = 2048  # pack this many rows at a time (bounds int64 temporaries on large weights)
K_ALIGN = 64  # every plane's row is a whole number of words, and kernels read K in tiles of >= 64 columns

# Width of each plane, top bits first, for each code width.
PLANE_SPLITS = {2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1), 8: (8,)}


def plane_widths(bits: int) -> tuple[int, ...]:
    if bits not in PLANE_SPLITS:
        raise ValueError(f"no plane split for {bits}-bit codes; supported widths: {sorted(PLANE_SPLITS)}")
    return PLANE_SPLITS[bits]


def plane_shifts(bits: int) -> tuple[int, ...]:
    """Position of each plane's lowest bit inside the code (plane 0 holds the top bits)."""
    widths = plane_widths(bits)
    return tuple(bits - sum(widths[: p + 1]) for p in range(len(widths)))


def padded_k(k: int) -> int:
    return -(-k // K_ALIGN) * K_ALIGN


def plane_words(width: int, k: int, start: int, stop: int) -> slice:
    """The words of a width-``width`` plane of a K=k weight that hold columns start..stop-1.

    A column range is whole words of every plane when start and stop are multiples of K_ALIGN (stop may also be k:
    the last range takes the zero padding along). Then the planes' words in this range are exactly what packing
    the codes of those columns alone gives. Raises ValueError for a range that is not.
    """
    if not 0 <= start < stop <= k:
        raise ValueError(f"column range {start}..{stop - 1} is not inside 0..{k - 1}")
    for edge in (start, stop):
        if edge % K_ALIGN and edge != k:
            raise ValueError(f"column {edge} of a {k}-column weight is not a multiple of {K_ALIGN}: a packed weight "
                             f"splits along K only at multiples of {K_ALIGN} columns")
    return slice(start * width // WORD_BITS, padded_k(stop) * width // WORD_BITS)


def _field_offsets(width: int, device) -> torch.Tensor:
    """Bit offset of each of a word's 32/width columns, in column order."""
    column = torch.arange(WORD_BITS // width, device=device)
    return 16 * (column % 2) + width * (column // 2)


def pack(codes: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    """Pack uint8 codes [N, K] (values < 2^bits) into bit planes, each int32 [N, padded_k(K) * w / 32]."""
    if codes.dim() != 2:
        raise ValueError(f"pack needs 2-D codes [N, K], got shape {tuple(codes.shape)}")
    if codes.dtype != torch.uint8:
        raise TypeError(f"pack needs uint8 codes, got {codes.dtype}")
    n, k = codes.shape
    if codes.numel() and int(codes.max()) >= 2**bits:
        raise ValueError(f"codes do not fit in {bits} bits (max code {int(codes.max())})")
    planes = [torch.empty(n, padded_k(k) * width // WORD_BITS, dtype=torch.int32, device=codes.device)
              for width in plane_widths(bits)]
    for start in range(0, n, ROWS_PER_CHUNK):  # int64 temporaries for a chunk of rows, not the whole weight
        rows = codes[start:start + ROWS_PER_CHUNK]
        full = torch.zeros(rows.shape[0], padded_k(k), dtype=torch.int64, device=codes.device)
        full[:, :k] = rows
        for plane, width, shift in zip(planes, plane_widths(bits), plane_shifts(bits)):
            fields = (full >> shift) & (2**width - 1)
            words = (fields.view(rows.shape[0], -1, WORD_BITS // width) << _field_offsets(width, codes.device)).sum(-1)
            # two's-complement view of the 32-bit word
            plane[start:start + ROWS_PER_CHUNK] = torch.where(words >= 2**31, words - 2**32, words)
    return tuple(planes)


def unpack(planes: "tuple[torch.Tensor, ...] | list[torch.Tensor]", bits: int, k: int) -> torch.Tensor:
    """Inverse of pack: uint8 codes [N, k]."""
    widths = plane_widths(bits)
    if len(planes) != len(widths):
        raise ValueError(f"{bits}-bit codes have {len(widths)} planes, got {len(planes)}")
    n = planes[0].shape[0]
    codes = None
    for plane, width, shift in zip(planes, widths, plane_shifts(bits)):
        expected = (n, padded_k(k) * width // WORD_BITS)
        if tuple(plane.shape) != expected or plane.dtype != torch.int32:
            raise ValueError(
                f"plane of width {width} must be int32 {expected}, got {plane.dtype} {tuple(plane.shape)}"
            )
        words = plane.to(torch.int64) & 0xFFFFFFFF
        fields = (words[:, :, None] >> _field_offsets(width, plane.device)) & (2**width - 1)
        part = fields.reshape(n, -1)[:, :k] << shift
        codes = part if codes is None else codes | part
    return codes.to(torch.uint8)
