"""fpx_linear against a float64 reference, FPxLinear, and quantize_model on small modules and a random LLaMA.

Tolerances are relative Frobenius errors against float64 x @ dequantize().T (+ bias): the reference path computes
in float32 and rounds the output to x's dtype, so the bound is a few units of x's dtype's rounding.
"""

import copy
import io

import pytest
import torch
from torch import nn

from fp6llm.formats import FPFormat
from fp6llm.nn import FPxLinear, quantize_model
from fp6llm.ops import fpx_linear, fpx_linear_op
from fp6llm.quantize import QuantizedWeight, quantize_weight
from helpers import seeded

MAIN_FORMATS = ["e3m2", "e2m3", "e2m2", "e3m1", "e2m1"]
# relative Frobenius error of the output against float64, per activation dtype (measured over 180 random cases:
# at most 1.8e-7, 2.6e-4, 2.3e-3)
TOLERANCE = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# (K, group_size): K not a multiple of 64 per channel; group scales of 32 and 64
GROUPINGS = [(200, None), (192, 64), (96, 32)]
LEADING_SHAPES = [(), (5,), (2, 3)]  # x of shape [K], [M, K], [B, T, K]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def reference(x: torch.Tensor, qw: QuantizedWeight, bias=None) -> torch.Tensor:
    out = x.double() @ qw.dequantize(torch.float64).T
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("use_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("leading", LEADING_SHAPES, ids=lambda s: "x" + "".join(f"{d}," for d in s) + "K")
@pytest.mark.parametrize("k, group_size", GROUPINGS, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_fpx_linear_matches_float64_reference(dtype, k, group_size, leading, use_bias, gen):
    n = 48
    qw = quantize_weight(torch.randn(n, k, generator=gen) * 0.05, "e3m2", group_size)
    x = torch.randn(*leading, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if use_bias else None
    y = fpx_linear(x, qw, bias)
    assert y.shape == (*leading, n) and y.dtype == dtype
    assert relative_error(y, reference(x, qw, bias)) < TOLERANCE[dtype]


@pytest.mark.parametrize("fmt", MAIN_FORMATS)
@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_fpx_linear_every_format(fmt, dtype, gen):
    qw = quantize_weight(torch.randn(40, 128, generator=gen), fmt, 32)
    x = torch.randn(7, 128, generator=gen).to(dtype)
    assert relative_error(fpx_linear(x, qw), reference(x, qw)) < TOLERANCE[dtype]


def test_fpx_linear_op_schema_and_fake_impl(gen):
    """The custom op's schema, fake (meta) implementation and dynamic-shape tracing, as torch.compile needs them."""
    qw = quantize_weight(torch.randn(48, 192, generator=gen), "e3m2", 64)
    x = torch.randn(3, 192, generator=gen)
    args = (x, list(qw.planes), qw.scales, torch.randn(48, generator=gen), 3, 2, 48, 192, 64)
    torch.library.opcheck(fpx_linear_op, args)


def test_fpx_linear_errors(gen):
    qw = quantize_weight(torch.randn(16, 64, generator=gen), "e3m2")
    x = torch.randn(4, 64, generator=gen)
    with pytest.raises(ValueError, match=r"shape \(4, 63\).*in_features=64"):
        fpx_linear(x[:, :63], qw)
    with pytest.raises(ValueError, match="in_features=64"):
        fpx_linear(torch.tensor(1.0), qw)
    with pytest.raises(TypeError, match="int64"):
        fpx_linear(torch.randint(5, (4, 64), generator=gen), qw)
    with pytest.raises(TypeError, match="float64"):
        fpx_linear(x.double(), qw)
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\).*got \(15,\)"):
        fpx_linear(x, qw, torch.randn(15, generator=gen))
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\).*got \(1, 16\)"):
        fpx_linear(x, qw, torch.randn(1, 16, generator=gen))
    with pytest.raises(TypeError, match="QuantizedWeight"):
        fpx_linear(x, torch.randn(16, 64, generator=gen))


# --- FPxLinear ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("fmt, group_size", [("e3m2", None), ("e2m3", 64), ("e2m1", 32)])
def test_from_linear_forward(fmt, group_size, use_bias, gen):
    linear = nn.Linear(192, 80, bias=use_bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(80, 192, generator=gen) * 0.05)
        if use_bias:
            linear.bias.copy_(torch.randn(80, generator=gen))
    layer = FPxLinear.from_linear(linear, fmt, group_size)
    assert (layer.in_features, layer.out_features, layer.fmt, layer.group_size) == \
        (192, 80, FPFormat.parse(fmt), group_size)
    assert f"fmt={fmt}" in repr(layer)
    x = torch.randn(2, 6, 192, generator=gen)
    with torch.no_grad():
        y, expected = layer(x), linear(x)
    assert relative_error(y, reference(x, layer.weight, linear.bias)) < TOLERANCE[torch.float32]
    # against the float layer: the weight's own quantization error, at most a quantum's half of 2^-(m+1)
    assert relative_error(y, expected) < 2.0 ** -(FPFormat.parse(fmt).man_bits + 1)
    for dtype in (torch.float16, torch.bfloat16):  # a float32 bias is cast to the activations' dtype
        assert layer(x.to(dtype)).dtype == dtype


def test_from_linear_needs_a_linear():
    with pytest.raises(TypeError, match="Conv1d"):
        FPxLinear.from_linear(nn.Conv1d(4, 4, 1))


def test_state_dict_round_trip_into_a_fresh_module(gen):
    source = seeded(gen, lambda: FPxLinear.from_linear(nn.Linear(130, 24), "e3m2", None))
    fresh = seeded(gen, lambda: FPxLinear.from_linear(nn.Linear(130, 24), "e3m2", None))  # another seed
    state = source.state_dict()
    assert set(state) == {"plane0", "plane1", "scales", "bias"}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    x = torch.randn(3, 130, generator=gen)
    assert torch.equal(fresh(x), source(x))
    assert all(torch.equal(a, b) for a, b in zip(fresh.weight.planes, source.weight.planes))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_casting_the_module_keeps_the_scales(dtype, gen):
    """model.to(dtype) casts floating-point buffers: the bias follows, the scales of the weight do not."""
    layer = seeded(gen, lambda: FPxLinear.from_linear(nn.Linear(64, 32), "e3m2", None))
    scales = layer.scales.clone()
    layer.to(dtype)
    assert layer.bias.dtype == dtype
    assert layer.scales.dtype == torch.float32 and torch.equal(layer.scales, scales)
    x = torch.randn(2, 64, generator=gen).to(dtype)
    assert relative_error(layer(x), reference(x, layer.weight, layer.bias)) < TOLERANCE[dtype]


# --- quantize_model ----------------------------------------------------------------------------------------------

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.block = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
        self.attn = nn.ModuleDict({"q_proj": nn.Linear(64, 64, bias=False), "k_proj": nn.Linear(64, 64)})
        self.lm_head = nn.Linear(64, 50, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.block(h) + self.attn["q_proj"](h) * self.attn["k_proj"](h)
        return self.lm_head(h)


def quantized_names(model: nn.Module) -> set:
    return {name for name, module in model.named_modules() if isinstance(module, FPxLinear)}


LINEAR_NAMES = {"block.0", "block.2", "attn.q_proj", "attn.k_proj", "lm_head"}


@pytest.mark.parametrize("skip, expected", [
    (("lm_head",), LINEAR_NAMES - {"lm_head"}),  # the default
    ((), LINEAR_NAMES),
    ("block.*", {"attn.q_proj", "attn.k_proj", "lm_head"}),  # one pattern as a str, on the full dotted name
    (("k_proj", "lm_*"), {"block.0", "block.2", "attn.q_proj"}),  # a layer's own name
    (("*.?_proj", "block.2"), {"block.0", "lm_head"}),
    (("*",), set()),
])
def test_quantize_model_skip_patterns(skip, expected, gen):
    model = seeded(gen, Tiny)
    assert quantize_model(model, "e3m2", skip=skip, progress=False) is model
    assert quantized_names(model) == expected
    assert {name for name, m in model.named_modules() if type(m) is nn.Linear} == LINEAR_NAMES - expected


@pytest.mark.parametrize("group_size", [None, 32])
def test_quantize_model_output_close_to_float(group_size, gen):
    model = seeded(gen, Tiny)
    ids = torch.randint(50, (2, 9), generator=gen)
    with torch.no_grad():
        expected = model(ids)
        quantize_model(model, "e3m2", group_size, progress=False)  # lm_head skipped by default
        assert all(m.group_size == group_size for m in model.modules() if isinstance(m, FPxLinear))
        assert relative_error(model(ids), expected) < 0.1


def test_quantize_model_cannot_replace_a_bare_linear():
    with pytest.raises(TypeError, match="from_linear"):
        quantize_model(nn.Linear(8, 8), progress=False)


def random_llama(seed: int):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=256, intermediate_size=128)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(config).eval()


def test_quantized_llama_logits_close_to_float(gen):
    """A random-initialized LLaMA (hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 256).

    Measured over 100 seeds, 4 x 32 tokens: e3m2 relative logits error 0.052 mean, 0.063 max; argmax agreement
    0.92 mean, 0.87 min; e2m1's error at least 1.9x e3m2's.
    """
    model = random_llama(int(torch.randint(2**31, (), generator=gen)))
    ids = torch.randint(256, (4, 32), generator=gen)
    with torch.no_grad():
        expected = model(ids).logits
        errors = {}
        for fmt in ("e3m2", "e2m1"):
            quantized = quantize_model(copy.deepcopy(model), fmt, progress=False)
            assert len(quantized_names(quantized)) == 2 * 7  # q, k, v, o, gate, up, down per layer
            assert type(quantized.lm_head) is nn.Linear
            logits = quantized(ids).logits
            errors[fmt] = relative_error(logits, expected)
            if fmt == "e3m2":
                agreement = (logits.argmax(-1) == expected.argmax(-1)).double().mean().item()
    assert errors["e3m2"] < 0.1
    assert agreement >= 0.75
    assert errors["e2m1"] > 1.3 * errors["e3m2"]


def test_fpx_linear_takes_x_in_the_wgmma_order(gen, monkeypatch):
    """FPxLinear(x, x_ordered=True) on x in the wgmma kernel's k order equals FPxLinear(x) bit for bit on the CPU,
    on its decoded-weight path and on fpx_linear's (decoded copy refused); takes_ordered_x says no on the CPU (only
    the CUDA wgmma path takes ordered x) and nn.ordered_for says no for a plain nn.Linear."""
    from fp6llm.kernels.wgmma_order import wgmma_x_order_reference
    from fp6llm.nn import ordered_for
    layer = FPxLinear(quantize_weight(torch.randn(48, 256, generator=gen) * 0.05, "e3m2"),
                      torch.randn(48, generator=gen))
    x = torch.randn(2, 3, 256, generator=gen)
    plain = layer(x)
    assert torch.equal(layer(wgmma_x_order_reference(x), x_ordered=True), plain)
    monkeypatch.setattr("fp6llm.nn.available_memory", lambda: None)  # no decoded copy: the op's reference path
    layer._decoded = None
    assert torch.equal(layer(wgmma_x_order_reference(x), x_ordered=True), layer(x))
    assert not layer.takes_ordered_x(x) and not ordered_for(layer, x) and not ordered_for(nn.Linear(256, 4), x)
