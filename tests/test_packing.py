"""Layout version 2 of packing.py (docs/layout.md): placement, fragment order, round trips, slicing, the v1 reader."""

import pytest
import torch

from fp6llm.formats import FPFormat, value_table
from fp6llm.packing import (LANES, TILE_K, TILE_N, WORD_BITS, _rotr_mask, fp16_pairs, pack, padded_k, padded_n,
                            placement, plane_shape, plane_widths, tile_index, unpack, unpack_v1, words_per_group)

ALL_FORMATS = [FPFormat(e, m) for e in range(1, 8) for m in range(8) if 2 <= 1 + e + m <= 8]
KERNEL_FORMATS = [f for f in ALL_FORMATS if f.exp_bits <= 4]


def random_codes(n, k, fmt, gen):
    return torch.randint(0, 2**fmt.bits, (n, k), generator=gen, dtype=torch.int64).to(torch.uint8)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_unpack_inverts_pack(fmt, gen):
    n, k = 37, 300  # neither a multiple of the tile
    codes = random_codes(n, k, fmt, gen)
    planes = pack(codes, fmt)
    assert [tuple(p.shape) for p in planes] == [plane_shape(n, k, w) for w in plane_widths(fmt.bits)]
    assert all(p.dtype == torch.int32 and p.is_contiguous() for p in planes)
    assert torch.equal(unpack(planes, fmt, k, n), codes)
    padded = unpack(planes, fmt, padded_k(k))  # the padding holds code 0
    assert padded.shape == (padded_n(n), padded_k(k)) and not padded[n:].any() and not padded[:, k:].any()


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_slot_placements_tile_every_word(fmt):
    """Each plane's stored fields (targets rotated right by their slot's rotation) partition the 32 bits."""
    for plane in placement(fmt):
        stored = [_rotr_mask(field.mask, r) for rotations in plane.rotations for field, r in zip(plane.fields, rotations)]
        assert sum(bin(mask).count("1") for mask in stored) == WORD_BITS
        union = 0
        for mask in stored:
            assert not union & mask
            union |= mask
        assert union == 0xFFFFFFFF
    assert sum(p.width for p in placement(fmt)) == fmt.bits


def test_six_bit_planes_hold_what_layout_md_says():
    """e3m2: a plane [e2 e1 e0 m1] at FP16 bits 12..9 and a plane [s m0] at bits 15 and 8, each moved by one rotate."""
    four, two = placement("e3m2")
    assert (four.width, two.width) == (4, 2)
    assert [(f.count, f.target) for f in four.fields] == [(4, 9)]
    assert [(f.count, f.target) for f in two.fields] == [(1, 8), (1, 15)]
    assert four.tied and two.tied and placement("e2m3")[1].tied
    assert four.mask == 0x1E001E00 and two.mask == 0x81008100


@pytest.mark.parametrize("fmt", KERNEL_FORMATS)
def test_fp16_pairs_are_exact_fp16_numbers(fmt, gen):
    """The kernels' de-quantization (rotate, mask, OR) gives FP16 value(code) * 2^(bias - 15), subnormals included."""
    n, k = 20, 256
    codes = random_codes(n, k, fmt, gen)
    codes[0, : min(k, 2**fmt.bits)] = torch.arange(min(k, 2**fmt.bits), dtype=torch.uint8)  # every code once
    pairs = fp16_pairs(pack(codes, fmt), fmt, n, k)
    halves = torch.stack([pairs & 0xFFFF, pairs >> 16], dim=-1).view(n, -1)[:, :k].to(torch.int16)
    got = halves.view(torch.float16).double()
    expected = value_table(fmt).double()[codes.long()] * 2.0 ** (fmt.bias - 15)
    assert torch.equal(got, expected)


def test_fragment_order_puts_each_weight_where_layout_md_says():
    """Weight (row 8 rl + g, column 32 t + 4 ks + 2 rh + h) of a tile is pair q = 4 ks + 2 rh + rl of lane 4 g + t,
    in word q // 4 of the 4-bit plane, stored at (j // 4) * 128 + lane * 4 + j % 4 of the tile's 256 words."""
    fmt = FPFormat.parse("e3m2")
    for row, col in [(0, 0), (9, 37), (15, 127), (4, 70)]:
        g, rl = row % 8, row // 8
        t, ks, rh = col // 32, (col % 32) // 4, (col % 4) // 2
        q, lane = 4 * ks + 2 * rh + rl, 4 * g + t
        codes = torch.zeros(TILE_N, 2 * TILE_K, dtype=torch.uint8)
        codes[row, TILE_K + col] = 0b011110  # magnitude bits 4..1 set: only the 4-bit plane holds them
        four, two = pack(codes, fmt)
        assert not two.any()
        nonzero = torch.nonzero(four[0, 1]).flatten().tolist()
        j = q // 4
        group = words_per_group(4)
        assert nonzero == [(j // group) * LANES * group + lane * group + j % group]
        assert not four[0, 0].any()


@pytest.mark.parametrize("fmt", ["e3m2", "e2m1", "e4m3", "e2m2"])
def test_tile_slices_equal_packing_the_slice(fmt, gen):
    fmt = FPFormat.parse(fmt)
    n, k = 48, 384
    codes = random_codes(n, k, fmt, gen)
    planes = pack(codes, fmt)
    for rows, cols in [((16, 48), None), (None, (128, 384)), ((0, 16), (256, 384))]:
        index = tile_index(n, k, rows, cols)
        part = codes[slice(*(rows or (0, n))), slice(*(cols or (0, k)))]
        for plane, expected in zip(planes, pack(part, fmt)):
            assert torch.equal(plane[index], expected)
    assert tile_index(40, 300, rows=(32, 40), cols=(256, 300)) == (slice(2, 3), slice(2, 3))  # to the edges
    with pytest.raises(ValueError, match="multiple of 16"):
        tile_index(n, k, rows=(8, 48))
    with pytest.raises(ValueError, match="multiple of 128"):
        tile_index(n, k, cols=(64, 384))


def v1_pack_reference(codes, bits):
    """Layout 1 as docs/layout.md described it: code bits in order, field of column r at 16 (r % 2) + w (r // 2)."""
    n, k = codes.shape
    k_pad = -(-k // 64) * 64
    full = torch.zeros(n, k_pad, dtype=torch.int64)
    full[:, :k] = codes
    planes, shift = [], bits
    for width in plane_widths(bits):
        shift -= width
        fields = (full >> shift) & (2**width - 1)
        column = torch.arange(WORD_BITS // width)
        words = (fields.view(n, -1, WORD_BITS // width) << (16 * (column % 2) + width * (column // 2))).sum(-1)
        planes.append(torch.where(words >= 2**31, words - 2**32, words).to(torch.int32))
    return planes


@pytest.mark.parametrize("bits", sorted({f.bits for f in ALL_FORMATS}))
def test_v1_planes_unpack(bits, gen):
    codes = torch.randint(0, 2**bits, (5, 100), generator=gen).to(torch.uint8)
    assert torch.equal(unpack_v1(v1_pack_reference(codes, bits), bits, 100), codes)
    with pytest.raises(ValueError, match="version-1 plane"):
        unpack_v1([p[:, :1] for p in v1_pack_reference(codes, bits)], bits, 100)


def test_pack_errors():
    with pytest.raises(TypeError, match="uint8"):
        pack(torch.zeros(2, 64, dtype=torch.int32), "e3m2")
    with pytest.raises(ValueError, match="2-D"):
        pack(torch.zeros(64, dtype=torch.uint8), "e3m2")
    with pytest.raises(ValueError, match="do not fit in 6 bits"):
        pack(torch.full((2, 64), 64, dtype=torch.uint8), "e3m2")
    with pytest.raises(ValueError, match="unsupported format"):
        pack(torch.ones(2, 64, dtype=torch.uint8), "e9m9")


def test_unpack_errors(gen):
    four, two = pack(random_codes(2, 100, FPFormat.parse("e3m2"), gen), "e3m2")
    with pytest.raises(ValueError, match="have 2 planes"):
        unpack((four,), "e3m2", 100)
    with pytest.raises(ValueError, match="must be int32"):
        unpack((four, two), "e3m2", 200)  # k of another padded width
    with pytest.raises(ValueError, match="must be int32"):
        unpack((four.long(), two), "e3m2", 100)
