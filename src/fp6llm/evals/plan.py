"""A per-layer format plan under a bit (or byte) budget: the least estimated loss for the bits allowed.

Sensitivity. For each linear layer and each candidate method, the loss increase from quantizing that layer alone
is estimated to second order with the empirical Fisher information of its weights (as HAWQ / SqueezeLLM do):
    delta_loss(layer, method) ~= 1/2 * sum_ij F_ij * (W_ij - Q(W)_ij)^2,   F = mean over windows of (dL/dW)^2,
where the gradients come from one backward pass per calibration window (the start of the pydoc text; the
evaluation windows are its end). This costs a few forward + backward passes instead of one evaluation per layer
and method (210 layers x 6 methods on SmolLM2).

Choice. Layers that a fused kernel reads as one weight (q/k/v, gate/up: one input) get one method together.
Minimizing sum(delta_loss) subject to sum(bits) <= budget is solved with a Lagrange multiplier: for a price
lambda each unit takes argmin delta_loss + lambda * bits; lambda is bisected to the smallest price that meets the
budget (a point on the lower convex hull of the loss-bits trade-off, never above the budget).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn

from ..models.loader import MODEL_CLASSES
from .baselines import Method
from .lm import quantizable_linears

# Projections that read the same input, by their last names: a decoder fuses them into one weight of one format
# (its class's FUSED: q/k/v, gate/up).
FUSED_GROUPS = tuple(dict.fromkeys(tuple(part.rpartition(".")[2] for part in parts)
                                   for model_class in MODEL_CLASSES.values() for parts in model_class.FUSED.values()))
BISECTION_STEPS = 60


def fused_units(names: Iterable[str]) -> list[tuple[str, ...]]:
    """The layer names grouped into units that share one method: q/k/v of a block together, gate/up together."""
    units, seen = [], set()
    names = list(names)
    for name in names:
        if name in seen:
            continue
        parent, _, last = name.rpartition(".")
        group = next((g for g in FUSED_GROUPS if last in g), (last,))
        unit = tuple(n for n in (f"{parent}.{part}" if parent else part for part in group) if n in names)
        units.append(unit or (name,))
        seen.update(unit or (name,))
    return units


def fisher_diagonal(model: nn.Module, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean over the windows [n, ctx] of the squared gradient of each window's mean next-token loss, per linear
    weight (float32, the weight's shape). Other parameters get no gradient."""
    linears = quantizable_linears(model)
    params = {name: m.weight for name, m in linears.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    fisher = {name: torch.zeros_like(w) for name, w in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(True)
        for window in windows:
            model.zero_grad(set_to_none=True)
            out = model(input_ids=window[None], labels=window[None], use_cache=False)
            out.loss.backward()
            for name, p in params.items():
                fisher[name] += p.grad.detach().square() / len(windows)
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return fisher


def sensitivities(model: nn.Module, fisher: dict, methods: Iterable[Method]) -> dict[str, dict[str, float]]:
    """{layer: {method name: estimated loss increase}} from the Fisher diagonal (see the module docstring)."""
    linears = quantizable_linears(model)
    out = {}
    for name, fisher_w in fisher.items():
        weight = linears[name].weight.detach().float()
        out[name] = {m.name: float(0.5 * (fisher_w * (weight - m.fake_quantize(weight)).square()).sum())
                     for m in methods}
    return out


@dataclass
class Plan:
    """Each layer's method, and what the plan is expected to cost: bits per weight and estimated loss increase."""

    layers: dict
    bits_per_weight: float
    estimated_loss: float

    def to_meta(self) -> dict:
        """{layer: {"format", "group_size", "scale_search"}}: what fp6llm.json stores and the loader reads."""
        meta = {}
        for name, text in self.layers.items():
            method = Method.parse(text)
            if method.kind != "fpx":
                raise ValueError(f"a packed plan holds FPx methods only; layer {name} has {text}")
            meta[name] = {"format": method.fmt.name, "group_size": method.group_size,
                          "scale_search": method.scale_search}
        return meta


def parse_budget(bits: Optional[float], budget_gb: Optional[float], weights: int) -> float:
    """The budget in bits per quantized weight, from --bits or from --budget-gb over ``weights`` linear weights."""
    if (bits is None) == (budget_gb is None):
        raise ValueError("give exactly one of bits (per weight) or budget_gb (gigabytes of linear weights)")
    target = bits if bits is not None else budget_gb * 8e9 / weights
    if not target > 0:
        raise ValueError(f"the budget must be positive, got {target} bits per weight")
    return target


def choose(sens: dict, shapes: dict, methods: Iterable[Method], bits_per_weight: float) -> Plan:
    """The plan of least total estimated loss whose bits per weight (over all layers) are <= the budget.

    sens: from ``sensitivities``; shapes: {layer: (N, K)}. Raises ValueError if even the cheapest method of every
    layer is above the budget.
    """
    methods = list(methods)
    units = fused_units(sens)
    cost = {u: {m.name: sum(sens[n][m.name] for n in u) for m in methods} for u in units}
    bits = {u: {m.name: sum(m.bits_per_weight(shapes[n][1]) * shapes[n][0] * shapes[n][1] for n in u)
                for m in methods} for u in units}
    total = sum(shapes[n][0] * shapes[n][1] for u in units for n in u)

    def pick(price: float) -> dict:
        return {u: min(cost[u], key=lambda m: (cost[u][m] + price * bits[u][m], bits[u][m])) for u in units}

    def bits_of(choice: dict) -> float:
        return sum(bits[u][m] for u, m in choice.items()) / total

    cheapest = {u: min(bits[u], key=bits[u].get) for u in units}
    if bits_of(cheapest) > bits_per_weight + 1e-9:
        raise ValueError(f"a budget of {bits_per_weight:.3f} bits per weight is below the cheapest candidate "
                         f"({bits_of(cheapest):.3f}); add a smaller format")
    low, high = 0.0, 1.0
    while bits_of(pick(high)) > bits_per_weight:
        high *= 4
    if bits_of(pick(low)) > bits_per_weight:
        for _ in range(BISECTION_STEPS):
            mid = (low + high) / 2
            low, high = (mid, high) if bits_of(pick(mid)) > bits_per_weight else (low, mid)
        choice = pick(high)
    else:
        choice = pick(low)
    layers = {n: m for u, m in choice.items() for n in u}
    return Plan(layers, bits_of(choice), sum(cost[u][m] for u, m in choice.items()))


def layer_label(name: str) -> str:
    """"model.layers.3.mlp.down_proj" -> "3.down_proj" (for a compact printout)."""
    match = re.search(r"layers\.(\d+)\..*?(\w+)$", name)
    return f"{match.group(1)}.{match.group(2)}" if match else name
