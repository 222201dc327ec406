"""OCP MX formats: element codes and E8M0 scales against ml_dtypes, the shared exponent rule, MX quantize_weight,
and MX weights through fpx_linear (reference) and the Triton kernel (interpreter on a CPU) against float64."""

import os

import numpy as np
import pytest
import torch

from fp6llm.formats import (E8M0_BIAS, MXFormat, decode, e8m0_decode, e8m0_encode, encode, mx_exponents,
                            parse_weight_format)
from fp6llm.ops import fpx_linear
from fp6llm.quantize import quantize_weight

ml_dtypes = pytest.importorskip("ml_dtypes")
MX_FORMATS = ["mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1"]
ML_TYPES = {"mxfp6_e3m2": "float6_e3m2fn", "mxfp6_e2m3": "float6_e2m3fn", "mxfp4_e2m1": "float4_e2m1fn"}


def ml_type(name):
    return getattr(ml_dtypes, ML_TYPES[name])


@pytest.mark.parametrize("name", MX_FORMATS)
def test_element_codes_decode_as_ml_dtypes(name):
    fmt = MXFormat.parse(name)
    codes = np.arange(fmt.element.num_codes, dtype=np.uint8)
    expected = codes.view(ml_type(name)).astype(np.float32)
    assert np.array_equal(decode(torch.from_numpy(codes), fmt.element).numpy(), expected)


@pytest.mark.parametrize("name", MX_FORMATS)
def test_element_encode_rounds_as_ml_dtypes(name, gen):
    """RNE and saturation: random values over the whole range and beyond, every midpoint, and the extremes."""
    fmt = MXFormat.parse(name).element
    values = torch.randn(4096, generator=gen, dtype=torch.float64) * fmt.max_value / 2
    values = torch.cat([values, torch.tensor([fmt.max_value * 1.5, -fmt.max_value * 9, 0.0, fmt.min_subnormal / 2])])
    table = decode(torch.arange(fmt.num_codes // 2), fmt).double()
    values = torch.cat([values, (table[1:] + table[:-1]) / 2, -(table[1:] + table[:-1]) / 2]).float()
    ours = decode(encode(values, fmt), fmt).numpy()
    theirs = values.numpy().astype(ml_type(name)).astype(np.float32)
    assert np.array_equal(ours, theirs)


def test_e8m0_encode_decode_as_ml_dtypes():
    codes = np.arange(256, dtype=np.uint8)
    expected = codes.view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    assert np.array_equal(e8m0_decode(torch.from_numpy(codes)).numpy(), expected, equal_nan=True)
    exponents = torch.arange(-127, 128)
    assert torch.equal(e8m0_encode(exponents), torch.arange(255, dtype=torch.uint8))
    assert torch.equal(e8m0_decode(e8m0_encode(exponents)), torch.ldexp(torch.ones(255), exponents.int()))
    with pytest.raises(ValueError, match=r"\[-127, 127\]"):
        e8m0_encode(torch.tensor([128]))
    with pytest.raises(TypeError):
        e8m0_encode(torch.tensor([1.0]))


@pytest.mark.parametrize("name", MX_FORMATS)
def test_shared_exponent_is_the_ocp_rule(name, gen):
    """X = floor(log2(absmax)) - emax_elem, from the definition in float64; the block max lands in the element's
    top binade [2^emax, 2^(emax + 1)), clamped to E8M0's range."""
    fmt = MXFormat.parse(name)
    absmax = torch.exp2(torch.rand(1000, generator=gen, dtype=torch.float64) * 60 - 30)
    expected = torch.floor(torch.log2(absmax)) - fmt.element_emax
    assert torch.equal(mx_exponents(absmax.float(), fmt).double(), expected)
    scaled = absmax / torch.exp2(expected)
    assert bool(((scaled >= 2.0**fmt.element_emax) & (scaled < 2.0 ** (fmt.element_emax + 1))).all())
    assert mx_exponents(torch.tensor([0.0, 1e-45, 3e38]), fmt).tolist() == [-E8M0_BIAS, -E8M0_BIAS,
                                                                           127 - fmt.element_emax]


@pytest.mark.parametrize("name", MX_FORMATS)
def test_mx_quantize_weight_is_the_definition(name, gen):
    """Scales are powers of two, one per 32 columns; codes are encode(w / 2^X) of the element format."""
    fmt = MXFormat.parse(name)
    w = torch.randn(24, 128, generator=gen) * torch.exp2(torch.randint(-6, 6, (24, 1), generator=gen).float())
    qw = quantize_weight(w, name)
    assert qw.fmt == fmt.element and qw.group_size == 32 and qw.scales.dtype == torch.float32
    exponents = mx_exponents(w.view(24, 4, 32).abs().amax(dim=2), fmt)
    assert torch.equal(qw.scales, torch.ldexp(torch.ones(24, 4), exponents))
    assert torch.equal(qw.codes(), encode(w / qw.expanded_scales(), fmt.element))
    assert torch.equal(quantize_weight(w, fmt, 32).codes(), qw.codes())  # group_size 32 may be given


def test_mx_parse_and_errors(gen):
    assert parse_weight_format("MXFP6").name == "mxfp6_e3m2" and parse_weight_format("mxfp4").name == "mxfp4_e2m1"
    assert parse_weight_format("e2m3").name == "e2m3"
    with pytest.raises(ValueError, match="mxfp6_e2m3"):
        MXFormat.parse("mxfp5")
    with pytest.raises(ValueError, match="one scale per 32"):
        quantize_weight(torch.randn(4, 64, generator=gen), "mxfp6_e2m3", 64)


@pytest.mark.parametrize("name", MX_FORMATS)
def test_mx_weight_through_fpx_linear(name, gen):
    w = torch.randn(40, 96, generator=gen) * 0.05
    qw = quantize_weight(w, name)
    x = torch.randn(5, 96, generator=gen)
    expected = x.double() @ qw.dequantize(torch.float64).T
    out = fpx_linear(x, qw)
    assert float((out.double() - expected).norm() / expected.norm()) < 1e-6


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("name", ["mxfp6_e3m2", "mxfp4_e2m1"])
def test_mx_weight_through_the_dequantize_kernel(name, gen):
    """The Triton de-quantize kernel (the path fpx_linear takes on CUDA for group-32 scales, which the fused GEMM
    does not take yet) reads MX scales as float32 powers of two: exact against the reference's dequantize."""
    from fp6llm.kernels.fpx_gemm import dequantize_planes

    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    n, k = 24, 128
    w = torch.randn(n, k, generator=gen) * torch.exp2(torch.randint(-8, 8, (n, 1), generator=gen).float())
    qw = quantize_weight(w, name).to(device)
    out = dequantize_planes(qw.planes, qw.scales, qw.fmt, n, k, 32, torch.float32)
    assert torch.equal(out.cpu(), qw.dequantize(torch.float32).cpu())
