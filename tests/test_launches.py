"""How many kernels one decode step launches per layer, counted on the CPU so that the number cannot creep back.

What is counted: every op that reaches PyTorch's dispatcher below autograd (a TorchDispatchMode sees each aten op
and each fp6llm custom op once, not what runs inside it) and writes memory: an op that mutates an input or returns
a tensor with storage of its own. Views (view, transpose, split, slice, expand), no-op casts (.to of the same
dtype) and bare allocations launch nothing on a GPU and are not counted. On CUDA each counted op is one kernel
launch for the fp6llm custom ops (add_norm, rotary, silu_mul; fpx_linear's Triton GEMM) and for elementwise aten
ops; scaled_dot_product_attention and scatter_ count 1 here and may launch a few more kernels on CUDA (the bool
mask's conversion). So this is a lower bound of the CUDA launches, exact for everything fp6llm's model code owns.

Per layer is the difference between a model of n + 1 layers and one of n, so the per-forward ops (embedding, the
mask, the final norm, lm_head) are left out.
"""

import collections
import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fp6llm.models import ModelConfig, build_random

# Per Llama layer at decode: add + RMSNorm x 2, the qkv / o / gate_up / down GEMMs, rotary of q and k with the
# paged cache's write of k and v (one kernel), silu_mul and paged attention: 9.
LLAMA_LAYER_BOUND = 9
# OPT: 2 LayerNorms (each with its residual add), 4 GEMMs (qkv, out, fc1, fc2), the activation, the cache write and
# attention.
OPT_LAYER_BOUND = 9


class CountLaunches(TorchDispatchMode):
    """Counts the ops that write memory (see the module docstring), by name in ``ops``."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs)) if t.numel()}
        outputs = [t for t in _tensors(out) if t.numel()]
        writes_new = any(t.untyped_storage().data_ptr() not in inputs for t in outputs)
        name = func._schema.name.partition("::")[2]  # "aten::scatter_" -> "scatter_", "fp6llm::rotary" -> "rotary"
        if (func._schema.is_mutable or writes_new) and not name.startswith(("empty", "new_empty")):
            self.ops[name] += 1
        return out


def _tensors(tree) -> list:
    flat, _ = torch.utils._pytree.tree_flatten(tree)
    return [t for t in flat if isinstance(t, torch.Tensor)]


@pytest.fixture(autouse=True)
def no_decoded_copies(monkeypatch):
    """A CPU FPxLinear would keep a decoded float32 copy and call a plain matmul (nn.py): count the custom op, the GPU
    path, instead."""
    import fp6llm.nn
    monkeypatch.setattr(fp6llm.nn, "DECODED_RESERVE", 2.0)  # never this much memory left: no copy is kept


def decode_launches(config: ModelConfig, fmt: str, batch: int = 2) -> collections.Counter:
    """Counted ops of one decode step (T = 1) of a random model of ``config`` after a prefill."""
    model = build_random(config, fmt, "cpu", progress=False)
    model.setup_caches(batch, 16)
    tokens, positions = torch.ones(batch, 1, dtype=torch.long), torch.full((batch, 1), 4)
    with torch.inference_mode():
        model(torch.ones(batch, 4, dtype=torch.long), torch.arange(4).expand(batch, -1))
        with CountLaunches() as counter:
            model(tokens, positions)
    return counter.ops


def per_layer(config: ModelConfig, fmt: str) -> collections.Counter:
    more = decode_launches(dataclasses.replace(config, n_layers=config.n_layers + 1), fmt)
    more.subtract(decode_launches(config, fmt))
    return +more


@pytest.mark.parametrize("fmt", ["e3m2", "fp32"])
def test_a_llama_layer_launches_at_most_the_bound(fmt):
    ops = per_layer(ModelConfig.from_name("tiny-llama"), fmt)
    print(f"per layer ({fmt}): {sum(ops.values())} {dict(ops)}")
    assert sum(ops.values()) <= LLAMA_LAYER_BOUND, dict(ops)
    assert ops["add_norm"] == 2 and ops["rotary_write_kv"] == 1 and ops["silu_mul"] == 1  # the fused kernels
    assert "rotary" not in ops and "write_kv" not in ops
    assert ops["fpx_linear" if fmt != "fp32" else "linear"] == 4  # qkv, o, gate_up, down


def test_an_opt_layer_launches_at_most_the_bound():
    config = ModelConfig(arch="opt", vocab_size=128, dim=64, n_layers=1, n_heads=4, intermediate_size=128,
                         activation="relu", qkv_bias=True, o_bias=True, mlp_bias=True, position_offset=2,
                         max_position_embeddings=32)
    ops = per_layer(config, "e3m2")
    print(f"per layer: {sum(ops.values())} {dict(ops)}")
    assert sum(ops.values()) <= OPT_LAYER_BOUND and ops["add_norm"] == 2 and ops["fpx_linear"] == 4, dict(ops)
