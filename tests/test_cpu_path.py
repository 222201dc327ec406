"""The CPU path's decoded-weight copy (fp6llm.nn.FPxLinear): equal bits to the custom op's reference, made once,
re-made when the weight changes, dropped on a move or cast, not made when memory does not allow it."""

import pytest
import torch

from fp6llm import nn as fp6nn
from fp6llm.nn import FPxLinear
from fp6llm.ops import fpx_linear
from fp6llm.quantize import quantize_weight


@pytest.mark.parametrize("fmt, group_size, dtype", [("e3m2", None, torch.float32), ("e2m1", 32, torch.bfloat16)])
def test_the_decoded_copy_gives_the_ops_bits_and_is_made_once(gen, fmt, group_size, dtype):
    n, k = 48, 96
    weight = torch.randn(n, k, generator=gen) * 0.05
    bias = torch.randn(n, generator=gen)
    layer = FPxLinear(quantize_weight(weight, fmt, group_size), bias)
    x = torch.randn(3, 5, k, generator=gen).to(dtype)
    expected = fpx_linear(x, layer.weight, bias.to(dtype))  # the op's reference: decodes at every call
    with torch.inference_mode():
        got = layer(x)
    assert got.dtype == dtype and torch.equal(got, expected)
    copy = layer.decoded_weight()
    assert copy is not None and layer.decoded_weight() is copy  # kept, not decoded again
    assert torch.equal(copy, layer.weight.dequantize(torch.float32))

    other = FPxLinear(quantize_weight(torch.randn(n, k, generator=gen), fmt, group_size), bias)
    layer.load_state_dict(other.state_dict())  # copies into the same buffers in place
    assert torch.equal(layer(x), fpx_linear(x, other.weight, bias.to(dtype)))
    layer.to(torch.float64)  # a cast drops the copy (the scales keep their dtype)
    assert layer._decoded is None


def test_no_copy_when_memory_does_not_allow_it(gen, monkeypatch):
    layer = FPxLinear(quantize_weight(torch.randn(32, 64, generator=gen), "e3m2"))
    x = torch.randn(2, 64, generator=gen)
    total = 10 * 2**30
    monkeypatch.setattr(fp6nn, "available_memory", lambda: (int(total * fp6nn.DECODED_RESERVE), total))
    assert layer.decoded_weight() is None and torch.equal(layer(x), fpx_linear(x, layer.weight))
    monkeypatch.setattr(fp6nn, "available_memory", lambda: None)  # no /proc/meminfo: no copy either
    assert layer.decoded_weight() is None
    monkeypatch.setattr(fp6nn, "available_memory", lambda: (total, total))
    assert layer.decoded_weight() is not None
