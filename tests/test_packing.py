"""Bit-plane packing: exact inverse, plane shapes, zero padding, the word layout drawn in docs/layout.md, errors."""

import pytest
import torch

from fp6llm.packing import K_ALIGN, PLANE_SPLITS, WORD_BITS, pack, padded_k, plane_shifts, plane_widths, unpack

SHAPES = [(1, 1), (1, 64), (3, 65), (5, 130), (2, 200), (7, 31), (4, 256), (1, 1000)]


def random_codes(n: int, k: int, bits: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(2**bits, (n, k), generator=gen, dtype=torch.uint8)


def signed_word(unsigned: int) -> int:
    """The int32 value of a 32-bit pattern."""
    return unsigned - 2**32 if unsigned >= 2**31 else unsigned


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bits", range(2, 9))
def test_unpack_inverts_pack(bits, shape, gen):
    n, k = shape
    codes = random_codes(n, k, bits, gen)
    planes = pack(codes, bits)
    assert len(planes) == len(plane_widths(bits))
    for plane, width in zip(planes, plane_widths(bits)):
        assert plane.dtype == torch.int32
        assert plane.shape == (n, padded_k(k) * width // WORD_BITS)
        assert plane.is_contiguous()
    assert torch.equal(unpack(planes, bits, k), codes)


@pytest.mark.parametrize("bits", range(2, 9))
def test_padding_columns_hold_code_zero(bits, gen):
    n, k = 3, 70
    planes = pack(random_codes(n, k, bits, gen), bits)
    padded = unpack(planes, bits, padded_k(k))
    assert padded_k(k) == 128 and padded.shape == (n, 128)
    assert not bool(padded[:, k:].any())


def test_plane_splits_match_the_layout_table():
    # docs/layout.md, "Planes": power-of-two widths, top bits first
    assert PLANE_SPLITS == {2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1), 8: (8,)}
    for bits, widths in PLANE_SPLITS.items():
        assert sum(widths) == bits
    assert plane_shifts(6) == (2, 0) and plane_shifts(5) == (1, 0) and plane_shifts(7) == (3, 1, 0)
    assert [padded_k(k) for k in (1, 63, 64, 65, 128, 129)] == [64, 64, 64, 128, 128, 192]
    assert K_ALIGN % WORD_BITS == 0


def test_four_bit_word_drawn_in_layout_md():
    # columns k0 .. k0+7 of one word: even columns in the low half, odd ones in the high half, each in column order
    codes = torch.arange(8, dtype=torch.uint8)[None, :].repeat(1, 8)  # k0 + i holds code i
    planes = pack(codes, 4)
    assert planes[0].shape == (1, 8)
    assert planes[0][0].tolist() == [0x75316420] * 8


def test_two_bit_word_drawn_in_layout_md():
    codes = (torch.arange(64) % 4).to(torch.uint8)[None, :]  # column k holds k mod 4
    # even columns: 0, 2, 0, 2, ... -> 0b10 in every other field of the low half; odd columns: 1, 3, 1, 3, ...
    assert pack(codes, 2)[0][0].tolist() == [signed_word(0xDDDD8888)] * 4


@pytest.mark.parametrize("bits", [6, 5, 4, 3, 7, 8, 2])
def test_every_field_sits_where_layout_md_says(bits, gen):
    """Build each word by hand from the picture: column r of a word at bit 16 * (r mod 2) + w * (r // 2)."""
    n, k = 2, 128
    codes = random_codes(n, k, bits, gen)
    planes = pack(codes, bits)
    shift = bits
    for plane, width in zip(planes, plane_widths(bits)):
        shift -= width  # plane 0 holds the code's top bits
        columns_per_word = WORD_BITS // width
        for row in range(n):
            words = []
            for j in range(k // columns_per_word):
                word = 0
                for r in range(columns_per_word):
                    field = (int(codes[row, j * columns_per_word + r]) >> shift) & (2**width - 1)
                    word |= field << (16 * (r % 2) + width * (r // 2))
                words.append(signed_word(word))
            assert plane[row].tolist() == words


def test_fp6_code_split_across_the_two_planes():
    # one FP6 code 0b110110 in column 0: bits 5..2 (0b1101) in the 4-bit plane, bits 1..0 (0b10) in the 2-bit plane
    codes = torch.zeros(1, 64, dtype=torch.uint8)
    codes[0, 0], codes[0, 1] = 0b110110, 0b000111
    four, two = pack(codes, 6)
    assert four[0, 0].item() == 0b1101 | 0b0001 << 16
    assert two[0, 0].item() == 0b10 | 0b11 << 16
    assert not bool(four[0, 1:].any()) and not bool(two[0, 1:].any())


@pytest.mark.parametrize("bits", [6, 5, 4])
def test_shards_pack_to_slices_of_the_packed_weight(bits, gen):
    """docs/layout.md, "Slicing": rows split anywhere, K at multiples of 64, bit-identically."""
    codes = random_codes(6, 192, bits, gen)
    planes = pack(codes, bits)
    for plane, row_shard in zip(planes, pack(codes[2:5], bits)):
        assert torch.equal(plane[2:5], row_shard)
    for plane, width, k_shard in zip(planes, plane_widths(bits), pack(codes[:, 64:128], bits)):
        words_per_64 = 64 * width // WORD_BITS
        assert torch.equal(plane[:, words_per_64: 2 * words_per_64], k_shard)


def test_pack_errors():
    with pytest.raises(TypeError, match="uint8"):
        pack(torch.zeros(2, 64, dtype=torch.int32), 6)
    with pytest.raises(TypeError, match="uint8"):
        pack(torch.zeros(2, 64), 6)
    with pytest.raises(ValueError, match="2-D"):
        pack(torch.zeros(64, dtype=torch.uint8), 6)
    with pytest.raises(ValueError, match="2-D"):
        pack(torch.zeros(2, 2, 64, dtype=torch.uint8), 6)
    with pytest.raises(ValueError, match="do not fit in 6 bits"):
        pack(torch.full((2, 64), 64, dtype=torch.uint8), 6)
    with pytest.raises(ValueError, match="do not fit in 4 bits"):
        pack(torch.tensor([[3, 16]], dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="no plane split"):
        pack(torch.ones(2, 64, dtype=torch.uint8), 9)


def test_unpack_errors(gen):
    four, two = pack(random_codes(2, 100, 6, gen), 6)
    with pytest.raises(ValueError, match="2 planes"):
        unpack((four,), 6, 100)
    with pytest.raises(ValueError, match="int32"):
        unpack((four, two), 6, 200)  # k of another padded width
    with pytest.raises(ValueError, match="int32"):
        unpack((four.long(), two), 6, 100)
    with pytest.raises(ValueError, match="no plane split"):
        unpack((four,), 1, 100)
