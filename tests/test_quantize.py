"""quantize_weight / QuantizedWeight: per-element error bound derived from the format, scales, sizes, errors."""

import math

import pytest
import torch

from fp6llm.formats import FPFormat, decode, encode
from fp6llm.packing import pack, plane_shape, tile_index
from fp6llm.quantize import QuantizedWeight, quantize_weight

MAIN_FORMATS = ["e3m2", "e2m3", "e2m2", "e3m1", "e2m1"]
WEIGHT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOAT32_SLACK = 2.0**-21  # relative: the float32 division by the scale and the float32 product of decode


def random_weight(n: int, k: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Gaussian rows of magnitudes 1e-3 .. 10, with some elements 1e-3 of their row: they land in the subnormal
    range of the format after scaling."""
    row_scale = 10.0 ** (torch.rand(n, 1, generator=gen) * 4 - 3)
    w = torch.randn(n, k, generator=gen) * row_scale
    small = torch.rand(n, k, generator=gen) < 0.1
    return torch.where(small, w * 1e-3, w).to(dtype)


def half_quantum(t: torch.Tensor, fmt: FPFormat) -> torch.Tensor:
    """Half the spacing of the format's values around magnitude t (t in format units, float64, within range):
    min_subnormal / 2 in the subnormal range, 2^(exponent - m - 1) in the binade [2^exponent, 2^(exponent + 1))."""
    binade = torch.floor(torch.log2(t.clamp(min=fmt.min_normal)))
    return torch.where(t < fmt.min_normal, torch.full_like(t, fmt.min_subnormal / 2),
                       torch.exp2(binade - fmt.man_bits - 1))


def assert_within_half_a_quantum(qw: QuantizedWeight, w: torch.Tensor) -> None:
    """|dequantized - w| <= scale * half a quantum at |w| / scale, for every element."""
    w64 = w.double()
    scale = qw.expanded_scales().double().expand_as(w64)
    t = (w64.abs() / scale).clamp(max=qw.fmt.max_value)
    bound = scale * half_quantum(t, qw.fmt) * (1 + FLOAT32_SLACK) + w64.abs() * FLOAT32_SLACK
    error = (qw.dequantize(torch.float64) - w64).abs()
    excess = error - bound
    worst = tuple(int(i) for i in torch.nonzero(excess == excess.max())[0])
    assert bool((excess <= 0).all()), (
        f"{qw.fmt.name}: element {worst} = {w64[worst].item()!r}, scale {scale[worst].item()!r}: error "
        f"{error[worst].item()!r} > bound {bound[worst].item()!r}")


@pytest.mark.parametrize("group_size", [None, 32, 64, 128], ids=lambda g: f"group{g}" if g else "per-channel")
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("fmt", MAIN_FORMATS)
def test_error_within_half_a_quantum(fmt, dtype, group_size, gen):
    w = random_weight(24, 256, dtype, gen)
    qw = quantize_weight(w, fmt, group_size)
    assert qw.shape == (24, 256) and qw.group_size == group_size and qw.fmt == FPFormat.parse(fmt)
    assert_within_half_a_quantum(qw, w)
    # the codes are exactly encode(w / scale)
    assert torch.equal(qw.codes(), encode(w.float() / qw.expanded_scales(), fmt))
    assert qw.dequantize(dtype).dtype == dtype


@pytest.mark.parametrize("fmt", MAIN_FORMATS)
def test_per_channel_scale_maps_the_row_absmax_to_max_value(fmt, gen):
    w = random_weight(16, 200, torch.float32, gen)
    qw = quantize_weight(w, fmt)
    absmax = w.abs().amax(dim=1)
    assert qw.scales.dtype == torch.float32 and qw.scales.shape == (16,)
    assert torch.allclose(qw.scales.double(), absmax.double() / FPFormat.parse(fmt).max_value, rtol=2**-23, atol=0)
    assert torch.equal(decode(qw.codes(), fmt).abs().amax(dim=1), torch.full((16,), FPFormat.parse(fmt).max_value))


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
def test_group_scales_are_float16_when_they_fit(dtype, gen):
    w = torch.randn(8, 256, generator=gen).to(dtype)
    qw = quantize_weight(w, "e3m2", group_size=64)
    assert qw.scales.dtype == torch.float16 and qw.scales.shape == (8, 4)
    # rounded up from absmax / max_value, so that no element saturates
    exact = w.float().view(8, 4, 64).abs().amax(dim=2).double() / 28.0
    assert bool((qw.scales.double() >= exact).all())
    assert bool((qw.scales.double() <= exact * (1 + 2**-10)).all())
    assert_within_half_a_quantum(qw, w)


@pytest.mark.parametrize("magnitude", [1e-9, 1e9])
def test_group_scales_stay_float32_when_one_does_not_fit_float16(magnitude, gen):
    w = torch.randn(8, 128, generator=gen)
    w[3, 64:] *= magnitude
    qw = quantize_weight(w, "e3m2", group_size=64)
    assert qw.scales.dtype == torch.float32
    assert_within_half_a_quantum(qw, w)


@pytest.mark.parametrize("group_size", [None, 64])
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
def test_all_zero_rows_and_groups(dtype, group_size, gen):
    w = torch.randn(6, 128, generator=gen).to(dtype)
    w[2] = 0
    w[4, :64] = 0
    qw = quantize_weight(w, "e3m2", group_size)
    assert bool(torch.isfinite(qw.scales).all()) and bool((qw.scales > 0).all())
    deq = qw.dequantize()
    assert not bool(deq[2].any())
    if group_size:
        assert not bool(deq[4, :64].any())
    assert_within_half_a_quantum(qw, w)


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
def test_scales_are_never_zero_or_inf(dtype, gen):
    finfo = torch.finfo(dtype)
    w = torch.randn(4, 64, generator=gen)
    w[0] = w[0].sign() * finfo.max * torch.rand(64, generator=gen)  # the dtype's largest values
    w[1] = w[1].sign() * finfo.tiny * torch.rand(64, generator=gen)  # its smallest normals and subnormals
    w = w.to(dtype)
    for group_size in (None, 32):
        qw = quantize_weight(w, "e2m1", group_size)
        assert bool(torch.isfinite(qw.scales).all()) and bool((qw.scales > 0).all())
        assert bool(torch.isfinite(qw.dequantize()).all())


def test_format_given_by_alias_or_object(gen):
    w = torch.randn(4, 64, generator=gen)
    assert torch.equal(quantize_weight(w, "fp6").planes[0], quantize_weight(w, FPFormat(3, 2)).planes[0])


def test_quantize_errors(gen):
    w = torch.randn(8, 96, generator=gen)
    with pytest.raises(ValueError, match=r"2-D .* \(96,\)"):
        quantize_weight(w[0])
    with pytest.raises(ValueError, match=r"2-D .* \(2, 4, 96\)"):
        quantize_weight(w.view(2, 4, 96))
    for bad_group in (64, 0, -32, 32.0):
        with pytest.raises(ValueError, match="group_size"):
            quantize_weight(w, group_size=bad_group)
    with pytest.raises(TypeError, match="int64"):
        quantize_weight(torch.randint(-5, 5, (8, 96), generator=gen))
    with pytest.raises(TypeError, match="float64"):
        quantize_weight(w.double())
    with pytest.raises(TypeError):
        quantize_weight(w.tolist())
    with pytest.raises(ValueError, match="unknown format"):
        quantize_weight(w, "fp7")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weight_names_the_row(bad, gen):
    w = torch.randn(8, 64, generator=gen)
    row = int(torch.randint(8, (), generator=gen))
    w[row, int(torch.randint(64, (), generator=gen))] = bad
    with pytest.raises(ValueError, match=f"the first is row {row}$"):
        quantize_weight(w)


def random_planes_weight(n: int, k: int, fmt: FPFormat, gen: torch.Generator) -> QuantizedWeight:
    """A QuantizedWeight of random planes and scales, without quantizing (cheap at any size)."""
    planes = tuple(torch.randint(-2**31, 2**31 - 1, plane_shape(n, k, width), generator=gen,
                                 dtype=torch.int32) for width in (4, 2))
    return QuantizedWeight(planes, torch.rand(n, generator=gen) + 0.5, fmt, (n, k))


def test_fp6_costs_six_sixteenths_of_fp16(gen):
    n = k = 8192
    qw = random_planes_weight(n, k, FPFormat(3, 2), gen)
    fp16_bytes = n * k * 2
    assert qw.nbytes == n * k * 6 // 8 + n * 4  # 48 MiB of planes + 32 KiB of float32 scales
    assert abs(qw.nbytes / fp16_bytes - 6 / 16) < 0.01 * 6 / 16


@pytest.mark.slow
def test_fp6_size_of_a_quantized_8192_square_weight(gen):
    n = k = 8192
    w = torch.randn(n, k, generator=gen) * 0.02
    qw = quantize_weight(w, "e3m2")
    assert qw.nbytes == n * k * 6 // 8 + n * 4
    assert abs(qw.nbytes / (n * k * 2) - 6 / 16) < 0.01 * 6 / 16
    # a row shard of the packed weight is a quantized weight of its own
    rows = slice(4000, 4016)  # one 16-row tile of the packed layout
    index = tile_index(n, k, rows=(rows.start, rows.stop))
    shard = QuantizedWeight(tuple(p[index] for p in qw.planes), qw.scales[rows], qw.fmt, (16, k))
    assert_within_half_a_quantum(shard, w[rows])


@pytest.mark.parametrize("group_size", [None, 64])
def test_to_cpu_round_trip(group_size, gen):
    w = torch.randn(8, 192, generator=gen)
    qw = quantize_weight(w, "e2m3", group_size)
    for device in ("cpu", torch.device("cpu")):
        moved = qw.to(device)
        assert moved is not qw and moved.device == torch.device("cpu")
        assert (moved.fmt, moved.shape, moved.group_size, moved.layout_version) == \
            (qw.fmt, qw.shape, qw.group_size, qw.layout_version)
        assert all(torch.equal(a, b) for a, b in zip(moved.planes, qw.planes))
        assert torch.equal(moved.scales, qw.scales)
        assert torch.equal(moved.dequantize(), qw.dequantize())


def test_constructor_accepts_lists_and_reports_shapes(gen):
    w = torch.randn(5, 100, generator=gen)
    qw = quantize_weight(w, "e3m2")
    rebuilt = QuantizedWeight(list(qw.planes), qw.scales, qw.fmt, [5, 100])
    assert isinstance(rebuilt.planes, tuple) and rebuilt.shape == (5, 100)
    assert (rebuilt.out_features, rebuilt.in_features) == (5, 100)
    assert torch.equal(rebuilt.dequantize(), qw.dequantize())


def test_constructor_validation(gen):
    fmt = FPFormat(3, 2)
    codes = torch.randint(64, (5, 100), generator=gen, dtype=torch.uint8)
    four, two = pack(codes, fmt)
    scales = torch.rand(5, generator=gen) + 0.5
    with pytest.raises(ValueError, match="needs 2 planes, got 1"):
        QuantizedWeight((four,), scales, fmt, (5, 100))
    with pytest.raises(ValueError, match="must be int32"):
        QuantizedWeight((four.long(), two), scales, fmt, (5, 100))
    with pytest.raises(ValueError, match=r"must be int32 \(1, 1, 256\)"):
        QuantizedWeight((four[:, :, :6], two), scales, fmt, (5, 100))  # not a whole tile
    with pytest.raises(ValueError, match="must be int32"):
        QuantizedWeight((four, two), scales, fmt, (17, 100))  # two 16-row tiles
    with pytest.raises(ValueError, match=r"scales must be float32/float16 \(5,\)"):
        QuantizedWeight((four, two), scales[:, None], fmt, (5, 100))
    with pytest.raises(ValueError, match="scales must be"):
        QuantizedWeight((four, two), scales.bfloat16(), fmt, (5, 100))
    with pytest.raises(ValueError, match="scales must be"):
        QuantizedWeight((four, two), scales.double(), fmt, (5, 100))
    with pytest.raises(ValueError, match=r"scales must be float32/float16 \(5, 5\)"):
        QuantizedWeight((four, two), scales, fmt, (5, 100), group_size=20)
    with pytest.raises(ValueError, match="layout version 1"):
        QuantizedWeight((four, two), scales, fmt, (5, 100), layout_version=1)  # v1 planes are repacked at load
    grouped = QuantizedWeight((four, two), torch.rand(5, 5, generator=gen).half(), fmt, (5, 100), group_size=20)
    assert grouped.expanded_scales().shape == (5, 100)
