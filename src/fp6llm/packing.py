"""Ahead-of-time bit-level pre-packing: the one place that knows the packed weight layout (docs/layout.md).

Layout version 2 (this module's `pack`). A weight of N x K codes of b bits is split into bit planes of power-of-two
widths (6 = 4 + 2, 5 = 4 + 1, ...). Unlike version 1, a plane does not hold the code's bits in code order: its fields
are PRE-PLACED for the de-quantization, so that one rotate and one mask of a plane word put a weight pair's bits
exactly where an FP16 number wants them (sign at bit 15, the magnitude bits at 10 - m ... 9 + e), two weights per
32-bit operation, and an OR of the planes is the finished fp16x2 register. Which magnitude bits a plane holds is
chosen so that its bits are contiguous in FP16 (e3m2 = a plane [e2 e1 e0 m1] and a plane [s m0]).

Tiles and fragments. The weight is cut into tiles of TILE_N = 16 rows x TILE_K = 128 columns. Inside a tile the
32 lanes of a warp each own 32 weight pairs, arranged as the A operand of mma.m16n8k16 (so a thread's register IS
its MMA fragment): lane l = 4 g + t, pair q = 4 ks + 2 rh + rl holds row 8 rl + g and columns
32 t + 4 ks + 2 rh + (0, 1) of the tile (ks = the MMA's k-step 0..7; the k order inside a tile is permuted so that
a lane's activations are 32 contiguous columns, which both operands of the MMA agree on). A plane of width w gives
each lane 2 w words (16 / w pairs each: pair q in word q // (16/w), slot q % (16/w)); the words of a tile are stored
lane-major in groups of up to four (one 128-bit load per lane, a warp reads 512 contiguous bytes). Each plane is an
int32 tensor [N_pad / 16, K_pad / 128, 64 w]: one tile is one contiguous block, tiles of a row block are contiguous
along K. N is padded to a multiple of 16 and K to a multiple of 128 with zero codes.

`placement(fmt)` derives, from the format alone, each plane's fields and the rotation of every slot; `pack`,
`unpack` and `fp16_pairs` (the bit-exact PyTorch twin of what the kernels compute) all read it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .formats import FPFormat

LAYOUT_VERSION = 2
SUPPORTED_LAYOUT_VERSIONS = (1, 2)  # version 1 checkpoints are repacked at load (unpack_v1, then pack)
WORD_BITS = 32
TILE_N = 16
TILE_K = 128
LANES = 32
PAIRS_PER_LANE = TILE_N * TILE_K // 2 // LANES  # 32
FP16_MAN_BITS = 10
FP16_SIGN_BIT = 15
ROWS_PER_CHUNK = 2048  # pack/unpack this many rows at a time (bounds int64 temporaries on large weights)
K_ALIGN_V1 = 64

# Width of each plane, widest first, for each code width.
PLANE_SPLITS = {2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1), 8: (8,)}


def plane_widths(bits: int) -> tuple[int, ...]:
    if bits not in PLANE_SPLITS:
        raise ValueError(f"no plane split for {bits}-bit codes; supported widths: {sorted(PLANE_SPLITS)}")
    return PLANE_SPLITS[bits]


def padded_n(n: int) -> int:
    return -(-n // TILE_N) * TILE_N


def padded_k(k: int) -> int:
    return -(-k // TILE_K) * TILE_K


def plane_shape(n: int, k: int, width: int) -> tuple[int, int, int]:
    """Shape of a width-``width`` plane of an n x k weight."""
    return (padded_n(n) // TILE_N, padded_k(k) // TILE_K, 2 * width * LANES)


def signed32(word: int) -> int:
    """A 32-bit word's bits as the int32 that stores them (planes, masks and kernel arguments are int32)."""
    return word - (1 << 32) if word >= 1 << 31 else word


def words_per_group(width: int) -> int:
    """A lane's words of one plane are stored in groups of this many (one 64/128-bit load each)."""
    return min(4, 2 * width)


# ---------------------------------------------------------------------------------------------------------------
# Placement: which bits each plane holds, where they go in FP16, and each slot's rotation


@dataclass(frozen=True)
class Field:
    """Bits lo .. lo + count - 1 of a plane's w-bit value land at FP16 bits target .. target + count - 1."""

    lo: int
    count: int
    target: int

    @property
    def mask(self) -> int:
        """This field's bits of a pair in an fp16x2 register (low half and high half)."""
        return ((1 << self.count) - 1) << self.target | ((1 << self.count) - 1) << (self.target + 16)


@dataclass(frozen=True)
class PlanePlacement:
    width: int
    code_shift: int  # the plane holds the code's magnitude bits code_shift .. (and the sign, if has_sign)
    fields: tuple  # of Field; at most two (magnitude run, sign)
    rotations: tuple  # rotations[slot][field]: rotl(word, r) & field.mask extracts that slot's field

    @property
    def slots(self) -> int:
        return 16 // self.width

    @property
    def tied(self) -> bool:
        """Every slot moves all its fields by one rotation (one shift per pair per plane)."""
        return all(len(set(r)) == 1 for r in self.rotations)

    @property
    def mask(self) -> int:
        return functools.reduce(lambda a, f: a | f.mask, self.fields, 0)


def _bits(mask: int) -> list[int]:
    return [b for b in range(WORD_BITS) if mask >> b & 1]


def _rotr_mask(mask: int, r: int) -> int:
    r %= WORD_BITS
    return ((mask >> r) | (mask << (WORD_BITS - r))) & 0xFFFFFFFF if r else mask


def _shift_cost(mask: int, r: int) -> float:
    """ALU cost of extracting a slot rotated by r: none for 0; a plain left shift can run as IMAD.SHL on the FMA pipe
    (cost 0.5); a right shift or a funnel rotate takes the integer ALU (cost 1)."""
    if r == 0:
        return 0.0
    return 0.5 if r <= min(_bits(mask)) else 1.0


def _tile(masks: list[int]) -> "list[int] | None":
    """A rotation for each item (a 32-bit mask of target bits) so that the stored masks (the targets rotated right)
    partition the 32 bits of a word, at the least total _shift_cost: branch and bound that always covers the lowest
    free bit next (every tiling is found that way), items of equal mask taken in order (they are interchangeable)."""
    candidates = [sorted(((_shift_cost(m, r), r, _rotr_mask(m, r)) for r in range(WORD_BITS))) for m in masks]
    best = {"cost": float("inf"), "rotations": None}

    def search(used: int, left: tuple, cost: float, chosen: dict):
        if cost >= best["cost"]:
            return
        if not left:
            if used == 0xFFFFFFFF:
                best["cost"], best["rotations"] = cost, dict(chosen)
            return
        free = (~used & -~used) & 0xFFFFFFFF  # lowest free bit
        tried = set()
        for i in left:
            if masks[i] in tried:
                continue
            tried.add(masks[i])
            for step, r, stored in candidates[i]:
                if stored & free and not stored & used:
                    chosen[i] = r
                    search(used | stored, tuple(j for j in left if j != i), cost + step, chosen)
                    del chosen[i]

    search(0, tuple(range(len(masks))), 0.0, {})
    found = best["rotations"]
    return None if found is None else [found[i] for i in range(len(masks))]


def magnitude_base(fmt: FPFormat) -> int:
    """FP16 bit of the code's magnitude bit 0: 10 - m puts the exponent at FP16's exponent's low end (exact FP16
    numbers for e <= 4, what the kernels need); wider exponents (e >= 6) are packed just under the sign."""
    return min(FP16_MAN_BITS - fmt.man_bits, FP16_SIGN_BIT - (fmt.bits - 1))


@functools.lru_cache(maxsize=None)
def placement(fmt: "FPFormat | str") -> tuple:
    """The PlanePlacement of every plane of ``fmt`` (widest first), derived from (e, m) alone.

    Magnitude bits are handed out top down (plane 0 takes the top ones); the sign goes to the last plane's top bit.
    Slot rotations come from a deterministic search that prefers no shift, then plain left shifts, and moves all
    fields of a slot together when such a tiling of the 32 bits exists.
    """
    fmt = FPFormat.parse(fmt)
    widths = plane_widths(fmt.bits)
    base = magnitude_base(fmt)
    magnitude = fmt.bits - 1
    planes = []
    for p, width in enumerate(widths):
        last = p == len(widths) - 1
        count = width - 1 if last else width
        code_shift = magnitude - sum(widths[:p]) - count
        fields = []
        if count:
            fields.append(Field(0, count, base + code_shift))
        if last:
            fields.append(Field(count, 1, FP16_SIGN_BIT))
        slots = 16 // width
        tied = _tile([functools.reduce(lambda a, f: a | f.mask, fields, 0)] * slots)
        if tied is not None:
            rotations = tuple((r,) * len(fields) for r in tied)
        else:
            flat = _tile([f.mask for _ in range(slots) for f in fields])
            if flat is None:  # cannot happen for contiguous fields of power-of-two planes; guard the invariant
                raise AssertionError(f"no placement for {fmt.name} plane {p}")
            rotations = tuple(tuple(flat[s * len(fields):(s + 1) * len(fields)]) for s in range(slots))
        planes.append(PlanePlacement(width, code_shift, tuple(fields), rotations))
    return tuple(planes)


def _rotl(x: torch.Tensor, r: int) -> torch.Tensor:
    """Rotate int64 tensors holding 32-bit words left by r."""
    r %= WORD_BITS
    return ((x << r) | (x >> (WORD_BITS - r))) & 0xFFFFFFFF if r else x


# ---------------------------------------------------------------------------------------------------------------
# The fragment order: (row, column pair) of a tile <-> (lane, pair q)


@functools.lru_cache(maxsize=None)
def _fragment_order():
    """index [16, 64] into a tile's lane-major pairs [LANES * 32]: tile (row, column pair) -> lane * 32 + q."""
    row = torch.arange(TILE_N)[:, None]
    pair = torch.arange(TILE_K // 2)[None, :]
    g, rl = row % 8, row // 8
    t, ks, rh = pair // 16, (pair % 16) // 2, pair % 2
    return (4 * g + t) * PAIRS_PER_LANE + 4 * ks + 2 * rh + rl


def _word_order(width: int) -> torch.Tensor:
    """index [LANES, 2w] -> position of lane l's word j inside the tile's 64 w stored words."""
    group = words_per_group(width)
    lane = torch.arange(LANES)[:, None]
    j = torch.arange(2 * width)[None, :]
    return (j // group) * LANES * group + lane * group + j % group


def _to_tiles(values: torch.Tensor) -> torch.Tensor:
    """[n_pad, k_pad // 2] per-pair values -> [n_tiles, k_tiles, LANES, 32] in lane/pair order."""
    n_pad, pairs = values.shape
    tiles = values.view(n_pad // TILE_N, TILE_N, pairs // 64, 64).permute(0, 2, 1, 3).reshape(
        n_pad // TILE_N, pairs // 64, TILE_N * 64)
    out = torch.empty_like(tiles)
    out[:, :, _fragment_order().reshape(-1).to(values.device)] = tiles
    return out.view(n_pad // TILE_N, pairs // 64, LANES, PAIRS_PER_LANE)


def _from_tiles(lanes: torch.Tensor) -> torch.Tensor:
    """Inverse of _to_tiles: [n_tiles, k_tiles, LANES, 32] -> [n_pad, k_pad // 2]."""
    n_tiles, k_tiles = lanes.shape[:2]
    flat = lanes.reshape(n_tiles, k_tiles, LANES * PAIRS_PER_LANE)
    tiles = flat[:, :, _fragment_order().reshape(-1).to(lanes.device)].view(n_tiles, k_tiles, TILE_N, 64)
    return tiles.permute(0, 2, 1, 3).reshape(n_tiles * TILE_N, k_tiles * 64)


# ---------------------------------------------------------------------------------------------------------------
# pack / unpack


def _check_codes(codes: torch.Tensor, bits: int):
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
        raise ValueError(f"pack needs 2-D codes [N, K], got shape {tuple(getattr(codes, 'shape', ()))}")
    if codes.dtype != torch.uint8:
        raise TypeError(f"pack needs uint8 codes, got {codes.dtype}")
    if codes.numel() and int(codes.max()) >= 2**bits:
        raise ValueError(f"codes do not fit in {bits} bits (max code {int(codes.max())})")


def _plane_value(codes: torch.Tensor, fmt: FPFormat, plane: PlanePlacement) -> torch.Tensor:
    """int64 w-bit value of one plane for each code: magnitude field (+ sign on top for the last plane)."""
    sign_bit = fmt.bits - 1
    count = plane.fields[0].count if plane.fields[0].target != FP16_SIGN_BIT else 0
    value = (codes >> plane.code_shift) & ((1 << count) - 1)
    if plane.fields[-1].target == FP16_SIGN_BIT:
        value = value | ((codes >> sign_bit) & 1) << count
    return value


def _placed_pairs(values: torch.Tensor, plane: PlanePlacement, field: Field) -> torch.Tensor:
    """Per pair (even column low half, odd column high half): the field's bits at their FP16 positions."""
    part = (values >> field.lo) & ((1 << field.count) - 1)
    return (part[:, 0::2] << field.target) | (part[:, 1::2] << (field.target + 16))


def pack(codes: torch.Tensor, fmt: "FPFormat | str") -> tuple[torch.Tensor, ...]:
    """Pack uint8 codes [N, K] of ``fmt`` into layout-2 planes, each int32 ``plane_shape(N, K, w)``."""
    fmt = FPFormat.parse(fmt)
    _check_codes(codes, fmt.bits)
    n, k = codes.shape
    planes = [torch.empty(plane_shape(n, k, p.width), dtype=torch.int32, device=codes.device)
              for p in placement(fmt)]
    for start in range(0, padded_n(n), ROWS_PER_CHUNK):  # ROWS_PER_CHUNK is a multiple of TILE_N
        rows = min(ROWS_PER_CHUNK, padded_n(n) - start)
        full = torch.zeros(rows, padded_k(k), dtype=torch.int64, device=codes.device)
        real = codes[start:start + rows]
        full[:real.shape[0], :k] = real
        for tensor, plane in zip(planes, placement(fmt)):
            values = _plane_value(full, fmt, plane)
            words = torch.zeros(rows // TILE_N, padded_k(k) // TILE_K, LANES, 2 * plane.width, dtype=torch.int64,
                                device=codes.device)
            for f, field in enumerate(plane.fields):
                lanes = _to_tiles(_placed_pairs(values, plane, field))  # [.., LANES, 32 pairs]
                for slot in range(plane.slots):
                    r = plane.rotations[slot][f]
                    stored = (_rotl(lanes[..., slot::plane.slots], WORD_BITS - r))  # rotr by r
                    words |= stored
            stored_order = torch.empty_like(words.view(*words.shape[:2], -1))
            stored_order[:, :, _word_order(plane.width).reshape(-1).to(codes.device)] = words.view(
                *words.shape[:2], -1)
            tile_rows = slice(start // TILE_N, (start + rows) // TILE_N)
            tensor[tile_rows] = torch.where(stored_order >= 2**31, stored_order - 2**32, stored_order).to(torch.int32)
    return tuple(planes)


def _lane_words(plane_tensor: torch.Tensor, width: int) -> torch.Tensor:
    """int64 [n_tiles, k_tiles, LANES, 2w] words of each lane, from the stored order."""
    stored = plane_tensor.to(torch.int64) & 0xFFFFFFFF
    return stored[:, :, _word_order(width).reshape(-1).to(stored.device)].view(*stored.shape[:2], LANES, 2 * width)


def _check_planes(planes, fmt: FPFormat, n: int, k: int):
    layout = placement(fmt)
    if len(planes) != len(layout):
        raise ValueError(f"{fmt.name} codes have {len(layout)} planes, got {len(planes)}")
    for plane, p in zip(planes, layout):
        expected = plane_shape(n, k, p.width)
        if tuple(plane.shape) != expected or plane.dtype != torch.int32:
            raise ValueError(f"plane of width {p.width} must be int32 {expected}, got {plane.dtype} "
                             f"{tuple(plane.shape)}")


def fp16_pairs(planes, fmt: "FPFormat | str", n: int, k: int) -> torch.Tensor:
    """int64 [N, K_pad / 2]: each pair's fp16x2 register exactly as the kernels de-quantize it (bit-exact twin).

    Per plane and slot: rotl(word, rotation) & field mask, OR-ed over fields and planes. The low 16 bits are the
    even column's FP16 number value(code) * 2^(bias - 15), the high 16 bits the odd column's.
    """
    fmt = FPFormat.parse(fmt)
    _check_planes(planes, fmt, n, k)
    pairs = None
    for tensor, plane in zip(planes, placement(fmt)):
        words = _lane_words(tensor, plane.width)
        lanes = torch.zeros(*words.shape[:3], PAIRS_PER_LANE, dtype=torch.int64, device=words.device)
        for slot in range(plane.slots):
            for f, field in enumerate(plane.fields):
                lanes[..., slot::plane.slots] |= _rotl(words, plane.rotations[slot][f]) & field.mask
        part = _from_tiles(lanes)
        pairs = part if pairs is None else pairs | part
    return pairs[:n]


def unpack(planes, fmt: "FPFormat | str", k: int, n: "int | None" = None) -> torch.Tensor:
    """Inverse of pack: uint8 codes [N, k] (``n`` defaults to the padded row count of the planes)."""
    fmt = FPFormat.parse(fmt)
    if n is None:
        n = planes[0].shape[0] * TILE_N
    pairs = fp16_pairs(planes, fmt, n, k)
    halves = torch.stack([pairs & 0xFFFF, pairs >> 16], dim=-1).view(n, -1)[:, :k]
    base = magnitude_base(fmt)
    magnitude = (halves >> base) & ((1 << (fmt.bits - 1)) - 1)
    sign = (halves >> FP16_SIGN_BIT) & 1
    return (sign << (fmt.bits - 1) | magnitude).to(torch.uint8)


def tile_index(n: int, k: int, rows: "tuple[int, int] | None" = None, cols: "tuple[int, int] | None" = None) -> tuple:
    """Index into a plane (any width) of an n x k weight that keeps rows start..stop-1 and/or columns start..stop-1:
    the packed form of that sub-weight, bit-identical to packing its codes alone. Ranges must start at a multiple of
    the tile (16 rows, 128 columns) and end at one or at the weight's edge; ValueError otherwise."""
    index = []
    for what, edge_range, size, tile in (("rows", rows, n, TILE_N), ("columns", cols, k, TILE_K)):
        if edge_range is None:
            index.append(slice(None))
            continue
        start, stop = edge_range
        if not 0 <= start < stop <= size:
            raise ValueError(f"{what} {start}..{stop - 1} are not inside 0..{size - 1}")
        for edge in (start, stop):
            if edge % tile and edge != size:
                raise ValueError(f"{what[:-1]} {edge} of a {size}-{what[:-1]} weight is not a multiple of {tile}: "
                                 f"a packed weight splits only at whole {tile}-{what[:-1]} tiles")
        index.append(slice(start // tile, -(-stop // tile)))
    return tuple(index)


# ---------------------------------------------------------------------------------------------------------------
# Layout version 1 (read only: v1 checkpoints are repacked at load)


def plane_shape_v1(n: int, k: int, width: int) -> tuple[int, int]:
    """Shape of a width-``width`` version-1 plane of an n x k weight: rows of ceil(k / 64) * 64 * w / 32 words."""
    return (n, -(-k // K_ALIGN_V1) * K_ALIGN_V1 * width // WORD_BITS)


def plane_shifts_v1(bits: int) -> tuple[int, ...]:
    widths = plane_widths(bits)
    return tuple(bits - sum(widths[: p + 1]) for p in range(len(widths)))


def unpack_v1(planes, bits: int, k: int) -> torch.Tensor:
    """uint8 codes [N, k] from version-1 planes (int32 [N, ceil(k / 64) * 64 * w / 32], code bits in code order,
    even columns in the low 16 bits of a word, odd columns in the high)."""
    widths = plane_widths(bits)
    if len(planes) != len(widths):
        raise ValueError(f"{bits}-bit codes have {len(widths)} planes, got {len(planes)}")
    n = planes[0].shape[0]
    codes = None
    for plane, width, shift in zip(planes, widths, plane_shifts_v1(bits)):
        expected = plane_shape_v1(n, k, width)
        if tuple(plane.shape) != expected or plane.dtype != torch.int32:
            raise ValueError(f"version-1 plane of width {width} must be int32 {expected}, got {plane.dtype} "
                             f"{tuple(plane.shape)}")
        column = torch.arange(WORD_BITS // width, device=plane.device)
        offsets = 16 * (column % 2) + width * (column // 2)
        words = plane.to(torch.int64) & 0xFFFFFFFF
        fields = (words[:, :, None] >> offsets) & (2**width - 1)
        part = fields.reshape(n, -1)[:, :k] << shift
        codes = part if codes is None else codes | part
    return codes.to(torch.uint8)
