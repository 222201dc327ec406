"""FPFormat, encode and decode: every code, every tie, saturation, and a brute-force nearest-value reference.

The reference here is written from the format's definition (sign | e exponent bits | m mantissa bits, bias
2^(e-1) - 1, subnormals, no Inf/NaN), independent of formats.py, and computed in float64.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fp6llm.formats import FPFormat, WeightFormat, code_value, decode, encode

MAIN_FORMATS = ["e3m2", "e2m3", "e2m2", "e3m1", "e2m1"]
# Every format the library accepts: e >= 1, m >= 0, 2 <= 1 + e + m <= 8.
ALL_FORMATS = [FPFormat(e, bits - 1 - e) for bits in range(2, 9) for e in range(1, bits)]
INPUT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


# --- the reference, from the definition ------------------------------------------------------------------------

def positive_values(fmt: FPFormat) -> torch.Tensor:
    """float64 values of the codes 0 .. 2^(bits-1) - 1, in code order (exponent field on top of the mantissa)."""
    e, m = fmt.exp_bits, fmt.man_bits
    bias = 2 ** (e - 1) - 1
    values = []
    for exp_field in range(2**e):
        for mantissa in range(2**m):
            if exp_field == 0:  # subnormal: 2^(1 - bias) * 0.mantissa
                values.append(2.0 ** (1 - bias) * mantissa / 2**m)
            else:
                values.append(2.0 ** (exp_field - bias) * (1 + mantissa / 2**m))
    return torch.tensor(values, dtype=torch.float64)


def all_values(fmt: FPFormat) -> torch.Tensor:
    """float64 values of all 2^bits codes: the sign bit on top makes the upper half the negated lower half."""
    positives = positive_values(fmt)
    return torch.cat([positives, -positives])


def sign_code(x: torch.Tensor, fmt: FPFormat) -> torch.Tensor:
    return torch.signbit(x).to(torch.int64) << (fmt.bits - 1)


def nearest_codes(x: torch.Tensor, fmt: FPFormat) -> torch.Tensor:
    """Brute force: the code of the nearest value to each element of x (1-D), ties to the even code, saturating.

    float64 distances: each of the two distances that decide is exact (Sterbenz), so ties are seen exactly.
    """
    positives = positive_values(fmt)
    magnitude = x.double().abs().clamp(max=fmt.max_value)  # saturation: beyond max_value the nearest is max_value
    distance = (magnitude[:, None] - positives[None, :]).abs()
    nearest = distance == distance.min(dim=1, keepdim=True).values
    is_even = torch.arange(len(positives)) % 2 == 0
    index = (nearest * (1 + is_even.long())).argmax(dim=1)  # of two nearest, the even one
    return index | sign_code(x, fmt)


def representable(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Mask of the float64 values that dtype holds exactly."""
    cast = values.to(dtype)
    return torch.isfinite(cast) & (cast.double() == values)


def assert_codes_equal(actual: torch.Tensor, expected: torch.Tensor, inputs: torch.Tensor, fmt: FPFormat):
    assert actual.dtype == torch.uint8
    bad = actual.long() != expected
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise AssertionError(
            f"{fmt.name}: {int(bad.sum())} of {len(bad)} inputs encoded wrongly; first: {inputs[i].item()!r} "
            f"({inputs.dtype}) -> code {int(actual[i])} = {code_value(int(actual[i]), fmt)}, expected code "
            f"{int(expected[i])} = {code_value(int(expected[i]), fmt)}"
        )


# --- parsing and fields --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("e3m2", (3, 2)), ("e2m3", (2, 3)), ("e2m2", (2, 2)), ("e3m1", (3, 1)), ("e2m1", (2, 1)),
    ("fp6", (3, 2)), ("fp5", (2, 2)), ("fp4", (2, 1)), ("FP6", (3, 2)), (" E2M3 ", (2, 3)), ("e4m3", (4, 3)),
])
def test_parse_names_and_aliases(name, expected):
    fmt = FPFormat.parse(name)
    assert (fmt.exp_bits, fmt.man_bits) == expected
    assert FPFormat.parse(fmt) is fmt
    assert FPFormat.parse(fmt.name) == fmt and str(fmt) == fmt.name


@pytest.mark.parametrize("name, bits, exp_bits, man_bits, bias, max_value, min_subnormal", [
    ("e3m2", 6, 3, 2, 3, 28.0, 0.0625),
    ("e2m3", 6, 2, 3, 1, 7.5, 0.125),
    ("e2m2", 5, 2, 2, 1, 7.0, 0.25),
    ("e3m1", 5, 3, 1, 3, 24.0, 0.125),
    ("e2m1", 4, 2, 1, 1, 6.0, 0.5),
])
def test_fields_of_main_formats(name, bits, exp_bits, man_bits, bias, max_value, min_subnormal):
    fmt = FPFormat.parse(name)
    assert (fmt.bits, fmt.exp_bits, fmt.man_bits, fmt.bias) == (bits, exp_bits, man_bits, bias)
    assert fmt.max_value == max_value
    assert fmt.min_subnormal == min_subnormal
    assert fmt.num_codes == 2**bits


def test_e2m1_is_the_ocp_fp4_table():
    assert decode(torch.arange(16), "e2m1").tolist() == [
        0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_fields_follow_the_definition(fmt):
    positives = positive_values(fmt)
    assert fmt.bits == 1 + fmt.exp_bits + fmt.man_bits
    assert fmt.bias == 2 ** (fmt.exp_bits - 1) - 1
    assert fmt.max_value == positives.max().item()
    assert fmt.min_subnormal == positives[positives > 0].min().item()
    assert fmt.min_normal == 2.0 ** (1 - fmt.bias)
    assert FPFormat.parse(fmt.name) == fmt


@pytest.mark.parametrize("name", ["fp7", "int4", "e3m2x", "e3", "", "fp6.5", "m2e3"])
def test_unknown_names_raise_listing_valid_ones(name):
    with pytest.raises(ValueError) as excinfo:
        FPFormat.parse(name)
    message = str(excinfo.value)
    assert repr(name) in message
    for valid in MAIN_FORMATS + ["fp6", "fp5", "fp4"]:
        assert valid in message


@pytest.mark.parametrize("name", ["e4m4", "e8m0", "e0m3", "e0m1", "e7m1"])
def test_out_of_range_formats_raise(name):
    with pytest.raises(ValueError, match=f"unsupported format {name}"):
        FPFormat.parse(name)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError):
        FPFormat(3, -1)
    with pytest.raises(TypeError):
        FPFormat(3.0, 2)
    with pytest.raises(TypeError):
        FPFormat.parse(6)


# --- decode ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_decode_every_code(fmt):
    codes = torch.arange(fmt.num_codes)
    values = decode(codes.to(torch.uint8), fmt)
    expected = all_values(fmt)
    assert values.dtype == torch.float32
    assert torch.equal(values.double(), expected)
    assert torch.equal(torch.signbit(values), torch.signbit(expected))  # -0.0 is the negative zero code
    assert values.tolist() == [code_value(c, fmt) for c in range(fmt.num_codes)]
    positives = values[: fmt.num_codes // 2]
    assert bool((positives[1:] > positives[:-1]).all()), "positive codes must be in increasing order of value"
    # any integer dtype and shape
    assert torch.equal(decode(codes.view(2, -1), fmt), values.view(2, -1))
    assert torch.equal(decode(codes.to(torch.int32), fmt), values)


def test_decode_errors():
    with pytest.raises(TypeError):
        decode(torch.tensor([1.0]), "e3m2")
    with pytest.raises(TypeError):
        decode(torch.tensor([True]), "e3m2")
    with pytest.raises(ValueError, match="out of range"):
        decode(torch.tensor([0, 64], dtype=torch.uint8), "e3m2")
    with pytest.raises(ValueError, match="out of range"):
        decode(torch.tensor([-1, 3]), "e2m1")


# --- encode: exact values, ties, saturation ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_every_value_round_trips(fmt, dtype):
    codes = torch.arange(fmt.num_codes)
    values = all_values(fmt)
    keep = representable(values, dtype)  # float16 lacks the extremes of the wide-exponent formats
    if dtype != torch.float16:
        assert bool(keep.all())
    x = values[keep].to(dtype)
    encoded = encode(x, fmt)
    assert_codes_equal(encoded, codes[keep], x, fmt)
    back = decode(encoded, fmt)
    assert torch.equal(back.double(), x.double())
    assert torch.equal(torch.signbit(back), torch.signbit(x))


def test_negative_zero_and_tiny_negatives_keep_the_sign():
    fmt = FPFormat.parse("e3m2")
    x = torch.tensor([-0.0, 0.0, -1e-30, 1e-30, -fmt.min_subnormal / 2, fmt.min_subnormal / 2])
    codes = encode(x, fmt)
    assert codes.tolist() == [32, 0, 32, 0, 32, 0]
    assert torch.signbit(decode(codes, fmt)).tolist() == [True, False, True, False, True, False]


def midpoints(fmt: FPFormat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 midpoints between consecutive non-negative values, with the codes just below and just above."""
    positives = positive_values(fmt)
    below = torch.arange(len(positives) - 1)
    return (positives[1:] + positives[:-1]) / 2, below, below + 1


@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_ties_go_to_the_even_code(fmt, dtype):
    mids, below, above = midpoints(fmt)
    keep = representable(mids, dtype)
    if dtype in (torch.float32, torch.float64):
        assert bool(keep.all())
    even = torch.where(below % 2 == 0, below, above)[keep]
    for sign in (1.0, -1.0):
        x = (sign * mids[keep]).to(dtype)
        codes = encode(x, fmt)
        assert_codes_equal(codes, even | sign_code(x, fmt), x, fmt)
        assert bool((codes & 1 == 0).all())


@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_one_ulp_off_a_tie_goes_to_the_nearer_value(fmt, dtype):
    """One ulp of the input dtype: a float64 input must not be rounded to float32 first (that would make a tie)."""
    mids, below, above = midpoints(fmt)
    keep = representable(mids, dtype)
    for sign in (1.0, -1.0):
        tie = (sign * mids[keep]).to(dtype)
        up = torch.nextafter(tie, torch.full_like(tie, sign * math.inf))  # away from zero: the larger magnitude
        down = torch.nextafter(tie, torch.zeros_like(tie))
        assert_codes_equal(encode(up, fmt), above[keep] | sign_code(tie, fmt), up, fmt)
        assert_codes_equal(encode(down, fmt), below[keep] | sign_code(tie, fmt), down, fmt)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_values_beyond_max_saturate(fmt):
    top_step = 2.0 ** (math.floor(math.log2(fmt.max_value)) - fmt.man_bits)  # spacing of the top binade
    above_max = [fmt.max_value + top_step / 2, fmt.max_value + top_step, fmt.max_value * 1.5, fmt.max_value * 4]
    max_code = fmt.num_codes // 2 - 1
    cases = [
        (torch.float64, above_max + [1e300, torch.finfo(torch.float64).max]),
        (torch.float32, above_max + [1e30, torch.finfo(torch.float32).max]),
        (torch.bfloat16, above_max + [torch.finfo(torch.bfloat16).max]),
        (torch.float16, above_max + [torch.finfo(torch.float16).max]),
    ]
    for dtype, values in cases:
        magnitudes = torch.tensor(values, dtype=torch.float64)
        magnitudes = magnitudes[representable(magnitudes, dtype) & (magnitudes > fmt.max_value)]
        x = torch.cat([magnitudes, -magnitudes]).to(dtype)
        assert_codes_equal(encode(x, fmt), max_code | sign_code(x, fmt), x, fmt)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_nan_and_inf_raise(bad, dtype):
    x = torch.tensor([1.0, -2.0, bad, 0.5], dtype=dtype)
    with pytest.raises(ValueError, match=r"NaN/Inf .* index \(2,\)"):
        encode(x, "e3m2")


def test_encode_needs_floats():
    with pytest.raises(TypeError):
        encode(torch.tensor([1, 2, 3]), "e3m2")
    with pytest.raises(TypeError):
        encode(torch.tensor([True]), "e3m2")


@pytest.mark.filterwarnings("ignore:torch.searchsorted.*non-contiguous")  # torch's perf hint
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (2, 3, 5)])
def test_encode_keeps_the_shape(shape, gen):
    x = torch.randn(shape, generator=gen) * 4
    codes = encode(x, "e2m3")
    assert codes.shape == x.shape and codes.dtype == torch.uint8
    if x.numel():
        assert_codes_equal(codes.flatten(), nearest_codes(x.flatten(), FPFormat(2, 3)), x.flatten(), FPFormat(2, 3))
    transposed = x.transpose(0, -1) if x.dim() > 1 else x  # a non-contiguous view
    assert torch.equal(encode(transposed, "e2m3"), codes.transpose(0, -1) if x.dim() > 1 else codes)


# --- encode against the brute-force reference on random inputs ---------------------------------------------------

def random_inputs(fmt: FPFormat, dtype: torch.dtype, n: int, gen: torch.Generator) -> torch.Tensor:
    """Inputs of every magnitude the dtype holds around the format's range, with extra weight on the subnormal
    range and the neighbourhood of ties; returned in ``dtype``."""
    finfo = torch.finfo(dtype)
    smallest = finfo.tiny * finfo.eps  # the dtype's smallest subnormal
    low = max(math.log2(fmt.min_subnormal) - 4, math.log2(smallest))
    high = min(math.log2(fmt.max_value) + 3, math.log2(finfo.max) - 1)
    log_magnitudes = low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)
    subnormal_range = torch.rand(n, generator=gen, dtype=torch.float64) * fmt.min_normal * 1.25
    mids = midpoints(fmt)[0]
    near_ties = mids[torch.randint(len(mids), (n,), generator=gen)]
    near_ties = near_ties * (1 + 2.0**-20 * torch.randn(n, generator=gen, dtype=torch.float64))
    magnitudes = torch.cat([log_magnitudes.exp2(), subnormal_range, near_ties])
    signs = torch.randint(2, magnitudes.shape, generator=gen) * 2 - 1
    x = (signs * magnitudes).to(dtype)
    return x[torch.isfinite(x)]


@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("fmt", [FPFormat.parse(name) for name in MAIN_FORMATS + ["e4m3", "e1m2", "e5m2"]])
def test_encode_matches_nearest_value(fmt, dtype, gen):
    x = random_inputs(fmt, dtype, 2000, gen)
    assert_codes_equal(encode(x, fmt), nearest_codes(x, fmt), x, fmt)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_every_format_matches_nearest_value(fmt, gen):
    x = random_inputs(fmt, torch.float32, 500, gen)
    assert_codes_equal(encode(x, fmt), nearest_codes(x, fmt), x, fmt)


@given(
    fmt=st.sampled_from(ALL_FORMATS),
    data=st.one_of(
        st.tuples(st.just(torch.float64), st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1,
                                                     max_size=32)),
        st.tuples(st.just(torch.float32), st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32),
                                                     min_size=1, max_size=32)),
        st.tuples(st.just(torch.float16), st.lists(st.floats(allow_nan=False, allow_infinity=False, width=16),
                                                     min_size=1, max_size=32)),
    ),
    scale_exponent=st.integers(-8, 8),
)
def test_encode_matches_nearest_value_hypothesis(fmt, data, scale_exponent):
    """Hypothesis's floats favour the edges (0, -0.0, subnormals of the input dtype, huge values); a power-of-two
    scale moves them across the format's range."""
    dtype, values = data
    x = torch.tensor(values, dtype=dtype) * 2.0**scale_exponent
    x = x[torch.isfinite(x)]
    assert_codes_equal(encode(x, fmt), nearest_codes(x, fmt), x, fmt)
    bf16 = x.to(torch.bfloat16)
    bf16 = bf16[torch.isfinite(bf16)]
    assert_codes_equal(encode(bf16, fmt), nearest_codes(bf16, fmt), bf16, fmt)


# ---- WeightFormat: the weights' storage, parsed once ----------------------------------------------------------------

def test_weight_format_spells_an_lm_head_format_of_its_own():
    """"BODY+head=FORMAT": lm_head in an FPx format of its own (per-channel), the body as BODY says; the name comes
    back in one spelling, body_name without the head; a bad head names what is wrong."""
    fmt = WeightFormat.parse(" FP6 + Head = e2m5 ", device="cpu", group_size=64)
    assert (fmt.quantized, fmt.head, fmt.group_size, fmt.dtype) == (FPFormat(3, 2), FPFormat(2, 5), 64, torch.float32)
    assert (fmt.name, fmt.body_name, str(fmt)) == ("e3m2+head=e2m5", "e3m2", "e3m2+head=e2m5")
    assert WeightFormat.parse(fmt.name, device="cpu", group_size=64) == fmt
    half = WeightFormat.parse("fp16+head=e4m3")
    assert (half.quantized, half.head, half.dtype, half.name) == (None, FPFormat(4, 3), torch.float16, "fp16+head=e4m3")
    assert WeightFormat.parse("e3m2", device="cpu").head is None
    with pytest.raises(ValueError, match=r"'e3m2\+e2m5': after '\+' comes head=FORMAT .* not 'e2m5'"):
        WeightFormat.parse("e3m2+e2m5")
    with pytest.raises(ValueError, match=r"'e3m2\+head=': after"):
        WeightFormat.parse("e3m2+head=")
    with pytest.raises(ValueError, match=r"'e3m2\+head=e9m9': lm_head format: unsupported format e9m9"):
        WeightFormat.parse("e3m2+head=e9m9")
    with pytest.raises(ValueError, match="unknown format 'fp7'"):
        WeightFormat.parse("fp7+head=e2m5")


def test_weight_format_parses_names_once_and_passes_its_value_through():
    fp6 = WeightFormat.parse("FP6", device="cpu", group_size=64)
    assert (fp6.quantized, fp6.dtype, fp6.group_size, fp6.name) == (FPFormat(3, 2), torch.float32, 64, "e3m2")
    assert WeightFormat.parse(fp6) is fp6 and WeightFormat.parse(fp6, group_size=64) is fp6
    assert WeightFormat.parse(None, torch.bfloat16) == WeightFormat(FPFormat(3, 2), torch.bfloat16)  # the default
    bf16 = WeightFormat.parse("bf16")
    assert bf16 == WeightFormat(None, torch.bfloat16) == WeightFormat.float_weights(torch.bfloat16)
    assert bf16.name == "bf16" and WeightFormat.parse("e2m1", device="cuda").dtype == torch.float16
    with pytest.raises(ValueError, match="unknown format 'fp7'.*or fp16 / bf16 / fp32 for unquantized weights"):
        WeightFormat.parse("fp7")
    with pytest.raises(ValueError, match="format 'fp16' keeps torch.float16 weights but dtype=torch.float32"):
        WeightFormat.parse("fp16", torch.float32)
    with pytest.raises(ValueError, match="group_size=32 needs a quantized format, not 'fp32'"):
        WeightFormat.parse("fp32", group_size=32)
    with pytest.raises(ValueError, match="e3m2 weights are torch.float32 with group_size=64, not dtype=None, "
                                         "group_size=32"):
        WeightFormat.parse(fp6, group_size=32)
    with pytest.raises(ValueError, match="float weights are float16, bfloat16 or float32, not torch.float64"):
        WeightFormat.float_weights(torch.float64)


def test_weight_format_list_gives_the_group_size_to_the_quantized_formats_only():
    fp16, fp5 = WeightFormat.parse_list(["fp16", " fp5 "], 32, "cpu")
    assert fp16 == WeightFormat(None, torch.float16) and fp5 == WeightFormat(FPFormat(2, 2), torch.float32, 32)
    assert WeightFormat.parse_list([fp16, fp5], 32, "cpu") == [fp16, fp5]  # parsed values stay as they are
