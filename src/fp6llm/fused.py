"""Fused projections: q/k/v as one linear (``qkv_proj``) and gate/up as one (``gate_up_proj``).

Which projections are fused, and of which parts, each model class declares (``FUSED``, relative to each of its
``layers``, beside ``TENSOR_PARALLEL``): each part is one of its tensor-parallel projections, whose features (query
heads, KV heads, MLP hidden units) give the part's rows.

A fused projection's weight is its parts' weights stacked by rows, in order, so one GEMM reads x once and writes
one output that the model splits by its head counts (q | k | v) or in halves (gate | up). Checkpoints keep the
parts' names (Hugging Face's q_proj, k_proj, ...; fp6llm's packed checkpoints of the unfused layout) and the loader
stacks them; the tensor-parallel plan (models/parallel.py) slices each part by its own rule, heads or intermediate
rows, and the rank's fused weight is the stack of its parts' slices.

Stacking rows commutes with quantization: scales are per row (or per group of a row's columns) and every code
depends only on its row's scales, so the stacked QuantizedWeight of quantized parts is the quantized stack, bit
for bit, as long as the scales keep one dtype (concat_quantized widens float16 group scales to float32 when the
parts disagree, exactly).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .nn import FPxLinear
from .packing import TILE_N, pack
from .quantize import QuantizedWeight

def features(config, kind: str) -> int:
    """Output features of a column-parallel projection that splits ``kind`` (the features of a TENSOR_PARALLEL
    role: "heads", "kv_heads" or "mlp") in a decoder of ``config``."""
    sizes = {"heads": config.n_heads * config.head_dim, "kv_heads": config.n_kv_heads * config.head_dim,
             "mlp": config.intermediate_size}
    if kind not in sizes:
        raise ValueError(f"{kind!r} is not a kind of projection features ({sorted(sizes)})")
    return sizes[kind]


def layout(model: nn.Module) -> dict:
    """{fused module name: ((part module name, first row, rows), ...)} of every fused projection in ``model``
    (meta or real), by its class's ``FUSED`` and ``TENSOR_PARALLEL`` and ``model.config``'s shapes; the part names
    are the unfused model's ("layers.0.self_attn.q_proj"). A model that declares no FUSED has none. Raises
    ValueError when a fused projection's size disagrees with the config."""
    declared = getattr(type(model), "FUSED", {})
    roles = getattr(type(model), "TENSOR_PARALLEL", {})
    if not declared:
        return {}
    fused = {}
    for i in range(len(model.layers)):
        for name, part_names in declared.items():
            module = model.get_submodule(f"layers.{i}.{name}")
            parts, offset = [], 0
            for part in part_names:
                if part not in roles:
                    raise ValueError(f"{type(model).__name__}.FUSED names {part}, which its TENSOR_PARALLEL does not")
                rows = features(model.config, roles[part][1])
                parts.append((f"layers.{i}.{part}", offset, rows))
                offset += rows
            if offset != module.out_features:
                raise ValueError(f"layers.{i}.{name} has {module.out_features} output features, its parts "
                                 f"{part_names} {offset} by the config")
            fused[f"layers.{i}.{name}"] = tuple(parts)
    return fused


def concat_quantized(weights: Sequence[QuantizedWeight]) -> QuantizedWeight:
    """The QuantizedWeight of the stacked rows of quantized weights of one format, group size and in_features."""
    first = weights[0]
    if any((w.fmt, w.group_size, w.in_features) != (first.fmt, first.group_size, first.in_features)
           for w in weights):
        raise ValueError("stacked weights need one format, group size and in_features, got "
                         f"{[(w.fmt.name, w.group_size, w.in_features) for w in weights]}")
    scale_dtype = torch.float32 if len({w.scales.dtype for w in weights}) > 1 else first.scales.dtype
    if all(w.out_features % TILE_N == 0 for w in weights[:-1]):  # whole 16-row tiles: stack the tiles as they are
        planes = tuple(torch.cat(stack) for stack in zip(*(w.planes for w in weights)))
    else:  # a part ends inside a tile: stack the codes and pack once
        planes = pack(torch.cat([w.codes() for w in weights]), first.fmt)
    scales = torch.cat([w.scales.to(scale_dtype) for w in weights])
    return QuantizedWeight(planes, scales, first.fmt, (sum(w.out_features for w in weights), first.in_features),
                           first.group_size, first.layout_version)


def concat_linears(modules: Sequence[nn.Module]) -> nn.Module:
    """One nn.Linear or FPxLinear whose rows are the stacked rows (weights, biases) of ``modules`` (all of one
    kind: nn.Linear, or FPxLinear of one format)."""
    biases = [m.bias for m in modules]
    if any((b is None) != (biases[0] is None) for b in biases):
        raise ValueError("stacked linears must all have a bias or all have none")
    bias: Optional[torch.Tensor] = None if biases[0] is None else torch.cat([b.detach() for b in biases])
    if all(isinstance(m, FPxLinear) for m in modules):
        return FPxLinear(concat_quantized([m.weight for m in modules]), bias)
    if not all(type(m) is nn.Linear for m in modules):
        raise TypeError(f"cannot stack {[type(m).__name__ for m in modules]}: nn.Linear or FPxLinear, not mixed")
    return linear_of(torch.cat([m.weight.detach() for m in modules]), bias)


def linear_of(weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> nn.Linear:
    """An nn.Linear (no grad) holding weight [N, K] and bias [N] themselves."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear
