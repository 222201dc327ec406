"""Tensor parallelism (Megatron style) as a pass over a finished model: the model's forward knows nothing of ranks.

Each of ``world_size`` ranks keeps a slice of every projection of every block. Which ones, and how, each model
class declares (``TENSOR_PARALLEL``, relative to each of its ``layers``):

    column-parallel (a range of output channels):  q_proj, k_proj, v_proj, gate_proj, up_proj (OPT: fc1)
    row-parallel (a range of input channels):      o_proj, down_proj (OPT: out_proj, fc2)

so a rank's attention runs on its own query heads (and the KV heads they read) and its MLP on its own hidden units.
A row-parallel layer's partial outputs are summed over the ranks by one all-reduce, then its bias is added once: two
all-reduces per block. Everything else (embeddings, norms, lm_head, OPT's project_in / project_out) is replicated,
the simplest choice: every rank computes the same residual stream and the same logits, so every rank samples the
same tokens and the engine runs unchanged on each (SPMD; give sampling a seed shared by the ranks,
engine/distributed.py's ``shared_seed``).

The fused projections (fused.py: qkv_proj, gate_up_proj) are column-parallel by parts: the plan slices each part
by its own rule (q by query heads, k and v by KV heads, gate and up by intermediate rows) and names the slices by
the parts' names, and the rank's fused weight is the stack of its parts' slices (q heads | k heads | v heads).

Heads: n_heads / world_size query heads per rank. KV heads are split the same way when there are at least as many as
ranks; with fewer (GQA, n_kv_heads < world_size) each rank keeps the one KV head its query heads read, so that head
is replicated on world_size / n_kv_heads ranks. The rank's model gets a config of its own shape (heads, KV heads,
intermediate_size divided: the model's ``use_local_config``), which sizes its KV cache and attention.

Weights are sliced in whatever form they hold: a plain nn.Linear's tensor (any float dtype), or an FPxLinear's packed
planes and scales: rows for column-parallel; for row-parallel whole tiles of every plane, i.e. multiples of 128 input
columns, and whole scale groups (docs/layout.md, "Tensor-parallel splits"). A slice is bit-identical to packing the
same float slice (per-channel scales stay the whole row's: quantize_weight's ``absmax``).

    model = apply_tensor_parallel(model, rank, world_size)          # slice a finished model (any format)
    model = load_hf(path, tp=TensorParallel(rank, world_size))     # or read only the rank's slices (loader.py)

The processes themselves (torchrun, the process group, shared seeds) are the engine's: engine/distributed.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from .. import fused
from ..nn import FPxLinear
from ..packing import plane_widths, tile_index
from ..quantize import QuantizedWeight

OUTPUT, INPUT = 0, 1  # the weight [N, K] dimension a layer is split along: column-parallel, row-parallel


@dataclass(frozen=True)
class TensorParallel:
    """This process's place among the tensor-parallel ranks. group: the torch.distributed process group of the
    all-reduces (None: the default group, looked up when the model runs)."""

    rank: int
    world_size: int
    group: Optional[object] = None

    def __post_init__(self):
        if not (isinstance(self.rank, int) and isinstance(self.world_size, int) and 0 <= self.rank < self.world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank {self.rank!r}, world_size {self.world_size!r}")


@dataclass(frozen=True)
class Split:
    """A rank's part of a weight [N, K]: rows (dim OUTPUT) or columns (dim INPUT) start..stop-1, one of ``degree``."""

    dim: int
    start: int
    stop: int
    degree: int

    @property
    def weight_index(self) -> tuple:
        part = slice(self.start, self.stop)
        return (part,) if self.dim == OUTPUT else (slice(None), part)

    @property
    def bias_index(self) -> tuple:
        """A column-parallel bias is sliced with the rows; a row-parallel one is whole (added once, after the sum)."""
        return (slice(self.start, self.stop) if self.dim == OUTPUT else slice(None),)

    def shape(self, n: int, k: int) -> tuple:
        return (self.stop - self.start, k) if self.dim == OUTPUT else (n, self.stop - self.start)


# ---- which slice each rank keeps ------------------------------------------------------------------------------------

def _feature_range(kind: str, config, tp: TensorParallel) -> tuple:
    """The rank's features (start, stop) of a layer that splits ``kind``; ValueError saying the size and degree."""
    degree, rank, head_dim = tp.world_size, tp.rank, config.head_dim
    if kind == "mlp":
        size = config.intermediate_size
        if size % degree:
            raise ValueError(f"intermediate_size {size} cannot be split evenly across tensor-parallel degree {degree}")
        return rank * size // degree, (rank + 1) * size // degree
    heads, kv_heads = config.n_heads, config.n_kv_heads
    if heads % degree:
        raise ValueError(f"{heads} attention heads ({heads * head_dim} features) cannot be split evenly across "
                         f"tensor-parallel degree {degree}")
    if kind == "heads":
        first, count = rank * (heads // degree), heads // degree
    elif kv_heads >= degree:
        if kv_heads % degree:
            raise ValueError(f"{kv_heads} KV heads ({kv_heads * head_dim} features) cannot be split evenly across "
                             f"tensor-parallel degree {degree}")
        first, count = rank * (kv_heads // degree), kv_heads // degree
    else:  # fewer KV heads than ranks: the one KV head this rank's query heads read
        if degree % kv_heads:
            raise ValueError(f"{kv_heads} KV heads ({kv_heads * head_dim} features) cannot serve tensor-parallel degree "
                             f"{degree}: with fewer KV heads than ranks the degree must be a multiple of n_kv_heads")
        first, count = rank // (degree // kv_heads), 1
    return first * head_dim, (first + count) * head_dim


def local_config(config, tp: TensorParallel):
    """The config of the rank's part of the decoder: its query heads, KV heads and MLP hidden units (dim, vocab and
    head_dim unchanged). Raises ValueError when the degree does not divide them."""
    for kind, layers in (("heads", "q_proj / o_proj"), ("kv_heads", "k_proj / v_proj"), ("mlp", "the MLP")):
        try:
            _feature_range(kind, config, tp)
        except ValueError as err:
            raise ValueError(f"{layers} of every layer: {err}") from None
    kv_heads = max(config.n_kv_heads // tp.world_size, 1)
    return dataclasses.replace(config, n_heads=config.n_heads // tp.world_size, n_kv_heads=kv_heads,
                               intermediate_size=config.intermediate_size // tp.world_size)


def _declared(model: nn.Module) -> dict:
    """The model class's ``TENSOR_PARALLEL``; TypeError for a model that does not declare it."""
    declared = getattr(type(model), "TENSOR_PARALLEL", None)
    if declared is None:
        raise TypeError(f"{type(model).__name__} does not declare its tensor-parallel projections (TENSOR_PARALLEL); "
                        f"fp6llm.models' decoders do")
    return declared


def projections(model: nn.Module) -> dict:
    """{module name: (dimension split, features it splits)} of every projection of every layer that tensor
    parallelism slices, from the model class's ``TENSOR_PARALLEL`` (by the unfused checkpoint's names: a fused
    projection's parts). Raises TypeError for a model that does not declare it."""
    declared = _declared(model)
    return {f"layers.{i}.{name}": role for i in range(len(model.layers)) for name, role in declared.items()}


def plan(model: nn.Module, tp: TensorParallel) -> dict:
    """{module name: Split} for every projection of ``model`` that is sliced (``projections``); works on a meta model.
    A fused projection's slices are its parts', under the parts' names (fused.layout: "layers.0.self_attn.q_proj").

    Raises ValueError naming the first layer that cannot be split at this degree (its size, the degree).
    """
    splits = {}
    for name, (dim, kind) in projections(model).items():
        try:
            start, stop = _feature_range(kind, model.config, tp)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        splits[name] = Split(dim, start, stop, tp.world_size)
    return splits


def check_split(name: str, split: Split, in_features: int, group_size: Optional[int] = None,
                packed: bool = False) -> None:
    """ValueError (naming the layer, its in_features and the degree) unless a row-parallel split falls on whole
    scale groups and, for weights already packed, on whole tiles of the packed layout (multiples of 128 columns;
    a column-parallel split of packed weights, multiples of 16 rows)."""
    if split.dim != INPUT:
        if packed and (split.start % 16 or split.stop % 16):
            raise ValueError(f"{name}: rows {split.start}..{split.stop - 1} of a tensor-parallel degree {split.degree} "
                             f"split are not whole 16-row tiles of the packed layout; load the float checkpoint "
                             f"instead (each rank packs its own slice) or choose another degree")
        return
    width = split.stop - split.start
    what = f"{name}: in_features {in_features} split across tensor-parallel degree {split.degree} gives {width}-column"
    if group_size and (split.start % group_size or split.stop % group_size):
        raise ValueError(f"{what} slices, not whole groups of group_size {group_size}")
    if packed:
        try:
            tile_index(1, in_features, cols=(split.start, split.stop))
        except ValueError as err:
            raise ValueError(f"{what} slices, but {err}; load the float checkpoint instead (each rank packs its own "
                             f"slice) or choose a degree that gives such slices") from None


# ---- slicing weights ------------------------------------------------------------------------------------------------

def plane_index(split: Split, width: int, in_features: int, out_features: int) -> tuple:
    """Index of the rank's part of a packed plane (whole 16-row / 128-column tiles: packing.tile_index); every
    plane width takes the same index."""
    if split.dim == OUTPUT:
        return tile_index(out_features, in_features, rows=(split.start, split.stop))
    return tile_index(out_features, in_features, cols=(split.start, split.stop))


def scale_index(split: Split, group_size: Optional[int]) -> tuple:
    """Index of the rank's scales: its rows; for row-parallel every row's per-channel scale, or its whole groups."""
    if split.dim == OUTPUT:
        return split.weight_index
    if group_size is None:
        return (slice(None),)
    return (slice(None), slice(split.start // group_size, split.stop // group_size))


def _own(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy with storage of its own (a view would keep the whole weight alive)."""
    return tensor.clone(memory_format=torch.contiguous_format)


def shard_quantized(qw: QuantizedWeight, split: Split) -> QuantizedWeight:
    """The rank's part of a quantized weight, sliced in packed form: bit-identical to packing the same codes alone.

    Raises ValueError for a range that is not whole tiles (packing.tile_index) or a split of another size.
    """
    n, k = qw.shape
    if split.stop > (n if split.dim == OUTPUT else k):
        raise ValueError(f"split {split} is outside a {n}x{k} weight")
    planes = tuple(_own(plane[plane_index(split, width, k, n)])
                   for plane, width in zip(qw.planes, plane_widths(qw.fmt.bits)))
    scales = _own(qw.scales[scale_index(split, qw.group_size)])
    return QuantizedWeight(planes, scales, qw.fmt, split.shape(n, k), qw.group_size, qw.layout_version)


def shard_fused(module: nn.Module, layout: tuple, splits: dict) -> nn.Module:
    """The rank's part of a fused projection (fused.layout's ``layout``): each part's slice of rows (``splits``, by
    part name), stacked."""
    pieces = []
    for part, offset, _ in layout:
        split = splits[part]
        pieces.append(shard_linear(part, module, Split(OUTPUT, offset + split.start, offset + split.stop,
                                                       split.degree)))
    return fused.concat_linears(pieces)


def shard_linear(name: str, module: nn.Module, split: Split) -> nn.Module:
    """A new nn.Linear / FPxLinear of the rank's part of ``module`` (weight and bias). Raises ValueError as
    check_split does."""
    bias = None if module.bias is None else _own(module.bias[split.bias_index])
    if isinstance(module, FPxLinear):
        check_split(name, split, module.in_features, module.group_size, packed=True)
        return FPxLinear(shard_quantized(module.weight, split), bias)
    n, k = split.shape(module.out_features, module.in_features)
    linear = nn.Linear(k, n, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(_own(module.weight[split.weight_index]), requires_grad=module.weight.requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=module.bias.requires_grad)
    return linear


# ---- running as one rank --------------------------------------------------------------------------------------------

def all_reduce(x: torch.Tensor, group=None) -> torch.Tensor:
    """The sum of x over the ranks, as a functional collective (traced by torch.compile, captured in CUDA graphs)."""
    return funcol.all_reduce(x, "sum", group if group is not None else dist.group.WORLD)


class RowParallel(nn.Module):
    """A row-parallel projection: the rank's slice of the input through its slice of the weight, summed over the
    ranks, then the bias, added once (not once per rank)."""

    def __init__(self, linear: nn.Module, group=None):
        super().__init__()
        bias = linear.bias
        linear.bias = None
        self.linear, self.group = linear, group
        if isinstance(bias, nn.Parameter):
            self.bias = bias
        else:
            self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = all_reduce(self.linear(x), self.group)
        return out if self.bias is None else out + self.bias.to(out.dtype)


def parallelize(model: nn.Module, tp: TensorParallel) -> nn.Module:
    """Make a model whose projections already hold the rank's slices (shard_linear, or a loader given the plan) run
    as that rank: it takes the rank's config (``use_local_config``: head counts for its attention), and each
    row-parallel layer is followed by an all-reduce (RowParallel). Returns the model, with
    ``model.tensor_parallel = tp``."""
    model.use_local_config(local_config(model.config, tp))
    for name, (dim, _) in projections(model).items():
        if dim == INPUT:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, RowParallel(model.get_submodule(name), tp.group))
    model.tensor_parallel = tp
    return model


def apply_tensor_parallel(model: nn.Module, rank: int, world_size: int, group=None) -> nn.Module:
    """Slice a finished decoder (fp6llm.models, any weight format) in place to rank ``rank`` of ``world_size``.

    Call it before ``setup_caches`` (the Engine calls that). Forward passes then need the process group (group, or
    the default one) with every rank running the same inputs. world_size 1 returns the model unchanged. Raises
    ValueError naming the layer, its size and the degree when a split is not possible (heads or intermediate_size
    not divisible; an FPxLinear's input columns not split at multiples of 128 or of its group size), or when the
    model is already tensor-parallel; TypeError for a model that does not declare its projections (projections).
    """
    tp = TensorParallel(rank, world_size, group)
    _declared(model)  # a TypeError before anything else for a model that does not declare its projections
    if model.tensor_parallel is not None:
        raise ValueError(f"the model is already tensor-parallel ({model.tensor_parallel})")
    if world_size == 1:
        return model
    splits, layouts = plan(model, tp), fused.layout(model)
    for name in [name for name, m in model.named_modules() if name in splits or name in layouts]:
        parent, _, child = name.rpartition(".")
        module = model.get_submodule(name)
        sharded = shard_fused(module, layouts[name], splits) if name in layouts else shard_linear(name, module,
                                                                                                  splits[name])
        setattr(model.get_submodule(parent), child, sharded)
    return parallelize(model, tp)
