"""Building models with real weights, one module at a time: from Hugging Face safetensors, from fp6llm's packed
checkpoints, or random. The model is first built on the meta device (no memory); then each module gets its tensors
on the target device and each Linear is quantized as soon as its weight exists, so neither host nor device ever
holds more than the quantized model plus one weight in its checkpoint dtype.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm

from .. import fused
from ..formats import DEFAULT_FORMAT, FPFormat, WeightFormat, resolve_device
from ..nn import FPxLinear
from ..packing import (LAYOUT_VERSION, SUPPORTED_LAYOUT_VERSIONS, pack, plane_shape, plane_shape_v1, plane_widths,
                       tile_index, unpack, unpack_v1)
from ..quantize import FLOAT_DTYPES, QuantizedWeight, quantize_weight
from . import gemma3, llama, opt
from .config import HF_NAMES, ModelConfig
from .parallel import INPUT, TensorParallel, check_split, parallelize, plan, plane_index, scale_index
from .trust import check_config_tensors, check_packed_meta, check_planes, check_scales, read_json

MODEL_CLASSES = {"llama": llama.Transformer, "opt": opt.Transformer, "gemma3": gemma3.Transformer}
PACKED_META = "fp6llm.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Where our module names sit in a Hugging Face checkpoint (lm_head is at the top level in every one).
# Gemma-3's multimodal checkpoints hold the text decoder under language_model.model. (as transformers 5 writes
# them) or model.language_model. (its modules' own names), beside a vision tower that is not loaded.
HF_PREFIXES = {"llama": ("model.",), "opt": ("model.decoder.", "decoder."),
               "gemma3": ("model.", "language_model.model.", "model.language_model.")}
RANDOM_STD = 0.02
SKIP = "lm_head"  # the one Linear that stays unquantized
ABSMAX_CHUNK_BYTES = 2**26  # rows read at a time to find the whole rows' absmax of a row-parallel slice


def build_model(config: ModelConfig, device=None) -> nn.Module:
    """The decoder of ``config.arch``, with freshly initialized weights on ``device`` ("meta": no memory)."""
    with torch.device(device or "cpu"):
        return MODEL_CLASSES[config.arch](config)


class SafetensorsCheckpoint:
    """The tensors of a directory's model.safetensors, or of the shards its model.safetensors.index.json lists.

    Raises FileNotFoundError for a missing file (naming it), ValueError for an unreadable (e.g. truncated) one or
    for a directory with only pickle checkpoints (.bin), which are never loaded.
    """

    def __init__(self, model_dir: Union[str, Path]):
        self.dir = Path(model_dir)
        self._files = ExitStack()
        self._handles = {}
        if (self.dir / INDEX_FILE).is_file():
            index = read_json(self.dir / INDEX_FILE)
            self.weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(self.weight_map, dict) or not all(
                    isinstance(file, str) and "/" not in file for file in self.weight_map.values()):
                raise ValueError(f"{self.dir / INDEX_FILE}: weight_map must name shard files in {self.dir}")
            for file in sorted(set(self.weight_map.values())):
                if not (self.dir / file).is_file():
                    raise FileNotFoundError(f"shard {self.dir / file} listed in {INDEX_FILE} is missing")
        elif (self.dir / SINGLE_FILE).is_file():
            self.weight_map = {name: SINGLE_FILE for name in self._open(SINGLE_FILE).keys()}
        elif any(self.dir.glob("*.bin")) or any(self.dir.glob("*.pt")) or any(self.dir.glob("*.pth")):
            raise ValueError(f"{self.dir} holds only pickle checkpoints (pytorch_model.bin); fp6llm loads "
                             f"safetensors only: convert it (e.g. save_pretrained(safe_serialization=True))")
        else:
            raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.dir}")
        self.bytes_read = 0

    def _open(self, file: str):
        if file not in self._handles:
            try:
                self._handles[file] = self._files.enter_context(safe_open(str(self.dir / file), framework="pt"))
            except (SafetensorError, OSError) as err:
                raise ValueError(f"cannot read {self.dir / file} (truncated or not safetensors?): {err}") from None
        return self._handles[file]

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple:
        """The shape of tensor ``name``, from its file's header (no data is read)."""
        file = self._open(self.weight_map[name])
        if name not in file.keys():
            raise ValueError(f"tensor {name!r} is missing from {self.dir / self.weight_map[name]}")
        return tuple(file.get_slice(name).get_shape())

    def read(self, name: str, shape, dtypes=FLOAT_DTYPES + (torch.float64,), device="cpu",
             index: Optional[tuple] = None) -> torch.Tensor:
        """Tensor ``name`` (only its part ``index``, a tuple of slices, when given: nothing else is read) on
        ``device``; ValueError if it is missing, of another shape, or not of ``dtypes``."""
        if name not in self.weight_map:
            raise ValueError(f"tensor {name!r} is missing from the checkpoint in {self.dir}")
        file = self._open(self.weight_map[name])
        if name not in file.keys():
            raise ValueError(f"tensor {name!r} is missing from {self.dir / self.weight_map[name]}")
        got = tuple(file.get_slice(name).get_shape())
        if got != tuple(shape):
            raise ValueError(f"tensor {name!r} in {self.dir / self.weight_map[name]} has shape {got}, "
                             f"expected {tuple(shape)}")
        tensor = file.get_tensor(name) if index is None else file.get_slice(name)[index]
        if tensor.dtype not in dtypes:
            raise ValueError(f"tensor {name!r} in {self.dir / self.weight_map[name]} is {tensor.dtype}, expected "
                             f"{' or '.join(str(d) for d in dtypes)}")
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor.to(device)

    def close(self) -> None:
        self._files.close()


class Source:
    """Where a meta module's real tensors come from; ``module(name, meta_module)`` returns the real module.

    Subclasses say where one tensor comes from (``tensor``, or only its part ``index``); a Linear other than lm_head
    is quantized to weight_format's (FPxLinear) unless it is float; every other tensor gets its dtype. shards
    ({module name: Split}, from parallel.plan): those Linears get only a tensor-parallel rank's slice. fused
    ({fused module name: parts}, fused.layout; stream_modules sets it): those Linears are stacked from their parts. layer_plan
    ({module name: {"format", "group_size", "scale_search"}}, a per-layer format plan as fp6llm.json stores it):
    those Linears get their own format instead of weight_format's.
    """

    def __init__(self, weight_format: WeightFormat, device: torch.device, shards: Optional[dict] = None):
        self.fmt, self.group_size = weight_format.quantized, weight_format.group_size
        self.head = weight_format.head  # lm_head's own format (materialize quantizes it last), None: float
        self.dtype, self.device = weight_format.dtype, device
        self.shards = shards or {}
        self.fused: dict = {}
        self.layer_plan = {}

    def layer_format(self, name: str) -> tuple:
        """(FPFormat, group size, scale search) of Linear ``name``: its layer_plan entry, else fmt / group_size."""
        entry = self.layer_plan.get(name)
        if entry is None:
            return self.fmt, self.group_size, None
        return FPFormat.parse(entry["format"]), entry.get("group_size"), entry.get("scale_search")

    def tensor(self, name: str, like: torch.Tensor, index: Optional[tuple] = None) -> torch.Tensor:
        raise NotImplementedError

    def has(self, name: str) -> bool:
        """Whether the source holds tensor ``name`` itself (a fused projection's, in a checkpoint of that layout)."""
        return False

    def module(self, name: str, module: nn.Module) -> nn.Module:
        if name in self.fused:
            if self.fmt is None or self.fused[name][0][0] not in self.layer_plan:
                return self.fused_linear(name, module)
            # a per-layer plan gives a fused projection's parts one format (fp6llm.evals.plan): that of its first
            saved = self.fmt, self.group_size
            self.fmt, self.group_size, _ = self.layer_format(self.fused[name][0][0])
            try:
                return self.fused_linear(name, module)
            finally:
                self.fmt, self.group_size = saved
        split = self.shards.get(name)
        if isinstance(module, nn.Linear) and self.fmt is not None and (name != SKIP or name in self.layer_plan):
            return self.linear(name, module)  # lm_head too where the plan names it: a packed checkpoint's own head
        real = module
        if split is not None:  # a Linear of the slice's shape, whose tensors come next
            n, k = split.shape(module.out_features, module.in_features)
            real = nn.Linear(k, n, bias=module.bias is not None, device="meta")
        for pname, meta in list(module.named_parameters(recurse=False)):
            index = None if split is None else split.weight_index if pname == "weight" else split.bias_index
            value = self.tensor(f"{name}.{pname}", meta, index)
            setattr(real, pname, nn.Parameter(value.to(self.dtype), requires_grad=False))
        return real

    def weight(self, name: str, like: torch.Tensor, split) -> tuple:
        """(a Linear's weight, or its ``split`` slice; each row's absmax over the whole weight when the slice is a
        column range to quantize with per-channel scales, else None). Here the whole weight is made, then sliced."""
        weight = self.tensor(name, like)
        if split is None:
            return weight, None
        absmax = weight.abs().amax(dim=1) if split.dim == INPUT and self.group_size is None else None
        return weight[split.weight_index].clone(), absmax

    def linear(self, name: str, module: nn.Linear) -> FPxLinear:
        split = self.shards.get(name)
        fmt, group_size, scale_search = self.layer_format(name)
        if split is not None:
            check_split(name, split, module.in_features, group_size)
        weight, absmax = self.weight(f"{name}.weight", module.weight, split)
        weight = weight if weight.dtype in FLOAT_DTYPES else weight.float()
        bias = None if module.bias is None else self.tensor(f"{name}.bias", module.bias,
                                                             None if split is None else split.bias_index)
        bias = None if bias is None else bias.to(self.dtype)
        return FPxLinear(quantize_weight(weight, fmt, group_size, absmax, scale_search), bias)

    def fused_rows(self, name: str, suffix: str, tail: tuple, read=None) -> torch.Tensor:
        """Rows of tensor ``suffix`` ("weight", "bias", "plane0", "scales", ...) of the fused projection ``name``:
        each part's rows (only the rank's slice of them, under a tensor-parallel plan) stacked in order. They are
        read from the fused tensor when the source has it, else from each part's own tensor (a Hugging Face
        checkpoint, a packed checkpoint of the unfused layout). tail: the tensor's shape after the rows.
        read(name, shape, index): how to read one tensor (default ``self.tensor``)."""
        read = read or (lambda n, shape, index: self.tensor(n, torch.empty(shape, device="meta"), index))
        parts = self.fused[name]
        whole = self.has(f"{name}.{suffix}")
        total = sum(rows for _, _, rows in parts)
        pieces = []
        for part, offset, rows in parts:
            split = self.shards.get(part)
            start, stop = (0, rows) if split is None else (split.start, split.stop)
            if whole:
                pieces.append(read(f"{name}.{suffix}", (total, *tail), (slice(offset + start, offset + stop),)))
            else:
                pieces.append(read(f"{part}.{suffix}", (rows, *tail), None if split is None else (slice(start, stop),)))
        return torch.cat(pieces)

    def fused_linear(self, name: str, module: nn.Linear) -> nn.Module:
        """A fused projection from its parts' rows; quantized once, as one weight, unless fmt is None."""
        bias = None if module.bias is None else self.fused_rows(name, "bias", ())
        weight = self.fused_rows(name, "weight", (module.in_features,))
        if self.fmt is None:
            weight, bias = (None if t is None else t.to(self.dtype) for t in (weight, bias))
            return fused.linear_of(weight, bias)
        weight = weight if weight.dtype in FLOAT_DTYPES else weight.float()
        bias = None if bias is None else bias.to(self.dtype)
        return FPxLinear(quantize_weight(weight, self.fmt, self.group_size), bias)


class HFSource(Source):
    """Tensors of a Hugging Face checkpoint, by the names of the architecture's prefixes."""

    def __init__(self, checkpoint: SafetensorsCheckpoint, arch: str, *args):
        super().__init__(*args)
        self.checkpoint, self.prefixes = checkpoint, HF_PREFIXES[arch]

    def tensor(self, name: str, like: torch.Tensor, index: Optional[tuple] = None) -> torch.Tensor:
        candidates = [name] if name.startswith(SKIP + ".") else [p + name for p in self.prefixes]
        hf_name = next((c for c in candidates if c in self.checkpoint), candidates[0])
        return self.checkpoint.read(hf_name, like.shape, device=self.device, index=index)

    def has(self, name: str) -> bool:
        return any(p + name in self.checkpoint for p in self.prefixes)

    def weight(self, name: str, like: torch.Tensor, split) -> tuple:
        """Reads only the slice; the whole rows' absmax (a column slice with per-channel scales) a few MiB of rows
        at a time, so memory holds about the slice."""
        if split is None or split.dim != INPUT or self.group_size is not None:
            return self.tensor(name, like, None if split is None else split.weight_index), None
        n, k = like.shape
        rows = max(1, ABSMAX_CHUNK_BYTES // (k * like.element_size()))
        absmax = torch.cat([self.tensor(name, like, (slice(start, start + rows),)).abs().amax(dim=1)
                            for start in range(0, n, rows)])
        return self.tensor(name, like, split.weight_index), absmax


class PackedSource(Source):
    """Tensors of an fp6llm packed checkpoint: FPxLinear buffers (planeI, scales, bias) by our module names."""

    def __init__(self, checkpoint: SafetensorsCheckpoint, *args, layout_version: int = LAYOUT_VERSION):
        super().__init__(*args)
        self.checkpoint = checkpoint
        self.layout_version = layout_version

    def tensor(self, name: str, like: torch.Tensor, index: Optional[tuple] = None) -> torch.Tensor:
        return self.checkpoint.read(name, like.shape, device=self.device, index=index)

    def has(self, name: str) -> bool:
        return name in self.checkpoint

    def fused_linear(self, name: str, module: nn.Linear) -> nn.Module:
        """The planes and scales of both layouts: the fused projection's own, or its parts' stacked (a checkpoint
        packed before projections were fused); a tensor-parallel plan reads only the rank's rows of each part."""
        if self.fmt is None:
            return super().fused_linear(name, module)
        k = module.in_features
        scales = self.fused_rows(name, "scales", () if self.group_size is None else (k // self.group_size,),
                                 self._read_scales)
        bias = None if module.bias is None else self.fused_rows(name, "bias", ())
        n = scales.shape[0]
        if self.has(f"{name}.plane0") and self.layout_version != 1:  # the fused tensor: its rank's rows, tile-wise
            planes = self._fused_planes(name, k)
        else:  # the parts' own tensors (a checkpoint packed before fusing): each part's codes, packed once
            codes = [self._part_codes(part, rows, k, self.shards.get(part)) for part, _, rows in self.fused[name]]
            planes = pack(torch.cat(codes), self.fmt)
        return FPxLinear(QuantizedWeight(planes, scales, self.fmt, (n, k), self.group_size), bias)

    def _fused_planes(self, name: str, k: int) -> tuple:
        """The fused tensor's planes, only the rank's rows of each part (whole 16-row tiles: tile_index)."""
        parts = self.fused[name]
        total = sum(rows for _, _, rows in parts)
        planes = []
        for i, width in enumerate(plane_widths(self.fmt.bits)):
            pieces = []
            for part, offset, rows in parts:
                split = self.shards.get(part)
                start, stop = (0, rows) if split is None else (split.start, split.stop)
                index = tile_index(total, k, rows=(offset + start, offset + stop))
                pieces.append(self.checkpoint.read(f"{name}.plane{i}", plane_shape(total, k, width), (torch.int32,),
                                                   self.device, index))
            planes.append(torch.cat(pieces))
        return tuple(planes)

    def _part_codes(self, part: str, rows: int, k: int, split) -> torch.Tensor:
        """uint8 codes of one part's packed tensor (layout 1 or 2), only the split's rows when there is a split."""
        if self.layout_version == 1:
            planes = tuple(self.checkpoint.read(f"{part}.plane{i}", plane_shape_v1(rows, k, width), (torch.int32,),
                                                self.device) for i, width in enumerate(plane_widths(self.fmt.bits)))
            codes = unpack_v1(planes, self.fmt.bits, k)
        else:
            planes = tuple(self.checkpoint.read(f"{part}.plane{i}", plane_shape(rows, k, width), (torch.int32,),
                                                self.device) for i, width in enumerate(plane_widths(self.fmt.bits)))
            codes = unpack(planes, self.fmt, k, rows)
        return codes if split is None else codes[split.weight_index]

    def _read_planes(self, name: str, shape: tuple, index: Optional[tuple]) -> torch.Tensor:
        return self.checkpoint.read(name, shape, (torch.int32,), self.device, index)

    def _read_scales(self, name: str, shape: tuple, index: Optional[tuple]) -> torch.Tensor:
        # parts packed apart may differ in scale dtype (float16 group scales where all fit): torch.cat widens them
        scales = self.checkpoint.read(name, shape, (torch.float32, torch.float16), self.device, index)
        check_scales(name, scales, str(self.checkpoint.dir))  # untrusted: finite and > 0
        return scales

    def linear(self, name: str, module: nn.Linear) -> FPxLinear:
        """The planes and scales (a tensor-parallel split: only the slice of them that shard_quantized keeps)."""
        n, k = module.weight.shape
        split = self.shards.get(name)
        fmt, group_size, _ = self.layer_format(name)
        if split is not None:
            check_split(name, split, k, group_size, packed=True)
        if self.layout_version == 1:
            planes = self._repack_v1(name, n, k, split)
        else:
            planes = tuple(self.checkpoint.read(f"{name}.plane{i}", plane_shape(n, k, width), (torch.int32,),
                                                self.device, None if split is None else plane_index(split, width, k, n))
                           for i, width in enumerate(plane_widths(fmt.bits)))
        scale_shape = (n,) if group_size is None else (n, k // group_size)
        scales = self._read_scales(f"{name}.scales", scale_shape,
                                   None if split is None else scale_index(split, group_size))
        bias = None if module.bias is None else self.tensor(f"{name}.bias", module.bias,
                                                             None if split is None else split.bias_index)
        shape = (n, k) if split is None else split.shape(n, k)
        return FPxLinear(QuantizedWeight(planes, scales, fmt, shape, group_size), bias)


    def _repack_v1(self, name: str, n: int, k: int, split) -> tuple:
        """Planes of a layout-1 checkpoint, read whole, unpacked to codes, cut to the split and packed as layout 2."""
        return pack(self._part_codes(name, n, k, split), self.fmt)


class RandomSource(Source):
    """Random weights (normal, std 0.02) made on the device; norm weights 1, biases 0."""

    def __init__(self, seed: int, *args):
        super().__init__(*args)
        self.generator = torch.Generator(self.device).manual_seed(seed)

    def tensor(self, name: str, like: torch.Tensor, index: Optional[tuple] = None) -> torch.Tensor:
        """Whole tensors are made and sliced, so that every tensor-parallel degree has the same weights."""
        if like.dim() == 1:  # a norm's weight or a bias
            value = (torch.ones if name.endswith(".weight") else torch.zeros)(like.shape, dtype=self.dtype,
                                                                               device=self.device)
        else:
            value = torch.randn(like.shape, generator=self.generator, dtype=self.dtype, device=self.device) * RANDOM_STD
        return value if index is None else value[index].clone()


def _tensor_modules(model: nn.Module, own_head: bool = False) -> list[tuple[str, nn.Module]]:
    """The modules that own parameters, in order; a tied lm_head is left out (it shares embed_tokens') unless
    ``own_head`` (a packed checkpoint's quantized lm_head: planes of its own)."""
    tied = model.config.tie_word_embeddings and not own_head
    return [(name, module) for name, module in model.named_modules()
            if next(module.parameters(recurse=False), None) is not None and not (tied and name == SKIP)]


def stream_modules(model: nn.Module, source: Source, progress: bool = True, desc: str = "load"
                   ) -> Iterator[tuple[str, nn.Module]]:
    """(name, real module) for each module of a meta ``model`` that owns parameters, made one at a time."""
    source.fused = fused.layout(model)
    modules = _tensor_modules(model, own_head=SKIP in source.layer_plan)
    for name, module in tqdm(modules, desc=desc, unit="module", disable=not progress):
        yield name, source.module(name, module)


def materialize(model: nn.Module, source: Source, progress: bool = True, desc: str = "load",
                tp: Optional[TensorParallel] = None) -> nn.Module:
    """Replace every module of a meta ``model`` by its real one from ``source``, in place; returns the model.

    tp: make only that tensor-parallel rank's part (parallel.plan's slices, then parallelize). Raises ValueError
    naming the first layer that cannot be split at its degree.
    """
    parallel = tp is not None and tp.world_size > 1
    if parallel:
        source.shards = plan(model, tp)
        desc = f"{desc} (rank {tp.rank} of {tp.world_size})"
    for name, real in stream_modules(model, source, progress, desc):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, real)
    stored_head = isinstance(model.lm_head, FPxLinear)  # read from a packed checkpoint's planes
    if model.config.tie_word_embeddings and not stored_head:
        model.lm_head.weight = model.embed_tokens.weight
    if source.head is not None and not stored_head:
        quantize_head(model, source.head)
    if parallel:
        parallelize(model, tp)
    return model.eval()


def quantize_head(model: nn.Module, fmt: FPFormat) -> None:
    """model.lm_head (float) as an FPxLinear of ``fmt`` with per-channel scales, in place. A tied lm_head gets
    planes of its own: the embedding keeps its float table (a step reads one row of it per token, and all of
    lm_head). Raises ValueError if lm_head is quantized already."""
    head = model.lm_head
    if not isinstance(head, nn.Linear):
        raise ValueError(f"lm_head is {type(head).__name__}, not a float nn.Linear: it cannot be quantized to "
                         f"{fmt.name} (is it quantized already?)")
    weight = head.weight.detach()
    weight = weight if weight.dtype in FLOAT_DTYPES else weight.float()
    model.lm_head = FPxLinear(quantize_weight(weight, fmt), None if head.bias is None else head.bias.detach())


def read_hf_config(model_dir: Union[str, Path]) -> ModelConfig:
    """ModelConfig of a Hugging Face model directory (config.json; eos ids from generation_config.json if any),
    checked against the tensors of its safetensors (trust.check_config_tensors) before anything is built."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    hf = read_json(model_dir / "config.json")
    generation = model_dir / "generation_config.json"
    if isinstance(hf, dict) and generation.is_file():
        eos = read_json(generation)
        eos = eos.get("eos_token_id") if isinstance(eos, dict) else None
        hf["eos_token_id"] = eos if eos is not None else hf.get("eos_token_id")
    config = ModelConfig.from_hf(hf, str(model_dir / "config.json"))
    _check_tensors(model_dir, config, HF_PREFIXES[config.arch] + ("",), str(model_dir / "config.json"), HF_NAMES)
    return config


def _check_tensors(model_dir: Path, config: ModelConfig, prefixes: tuple, where: str, field_names=None,
                   fmt: Union[FPFormat, None, bool] = False, head: Optional[FPFormat] = None) -> None:
    """The config (and fmt's planes, unless False; lm_head's with ``head``'s, where the checkpoint stores lm_head
    quantized) against the checkpoint's tensors: see fp6llm.models.trust."""
    checkpoint = SafetensorsCheckpoint(model_dir)
    try:
        check_config_tensors(config, checkpoint.weight_map, checkpoint.shape, prefixes, where, field_names)
        if head is not None:
            check_planes(head, [n for n in checkpoint.weight_map if n.startswith(f"{SKIP}.")], checkpoint.shape,
                         where)
        if fmt is not False:
            body = [n for n in checkpoint.weight_map if head is None or not n.startswith(f"{SKIP}.")]
            check_planes(fmt, body, checkpoint.shape, where)
    finally:
        checkpoint.close()


def load_hf(model_dir: Union[str, Path], fmt: Union[str, FPFormat, WeightFormat, None] = None,
            group_size: Optional[int] = None, device=None, dtype: Optional[torch.dtype] = None, progress: bool = True,
            tp: Optional[TensorParallel] = None) -> nn.Module:
    """Load a model directory: Hugging Face safetensors (quantized to ``fmt`` while loading, default e3m2), or an
    fp6llm packed checkpoint (a directory with fp6llm.json: loaded as packed, see load_packed).

    fmt: an FPFormat name ("e3m2", "fp6", ...) or "fp16" / "bf16" / "fp32" for unquantized weights, or a
    WeightFormat (then without group_size / dtype). dtype: the activations' (and norms', embeddings', lm_head's)
    dtype, default float16 on CUDA, float32 on CPU. tp: load only
    that tensor-parallel rank's slices (parallel.py; each rank quantizes its own). Returns the model in eval mode on
    ``device``; call ``setup_caches`` before running it.
    Raises FileNotFoundError (config.json, shards), ValueError (unsupported model, missing / misshapen tensors).
    """
    model_dir = Path(model_dir)
    if (model_dir / PACKED_META).is_file():
        return load_packed(model_dir, fmt, group_size, device, dtype, progress, tp)
    config = read_hf_config(model_dir)
    weight_format = WeightFormat.parse(fmt, dtype, device, group_size)
    checkpoint = SafetensorsCheckpoint(model_dir)
    try:
        source = HFSource(checkpoint, config.arch, weight_format, resolve_device(device))
        return materialize(build_model(config, "meta"), source, progress, f"load {weight_format}", tp)
    finally:
        checkpoint.close()


def read_packed_meta(model_dir: Union[str, Path]) -> dict:
    """fp6llm.json of a packed checkpoint, checked against its tensors (config sizes, planes: fp6llm.models.trust);
    ValueError if its layout version is not one this fp6llm reads (version 1 checkpoints are repacked to version 2
    at load), or for what the checks find."""
    where = Path(model_dir) / PACKED_META
    meta = read_json(where)
    check_packed_meta(meta, str(where))
    if meta.get("layout_version") not in SUPPORTED_LAYOUT_VERSIONS:
        raise ValueError(f"{model_dir} was packed with layout version {meta.get('layout_version')!r}; this fp6llm "
                         f"reads layout versions {', '.join(map(str, SUPPORTED_LAYOUT_VERSIONS))}: re-run fp6llm "
                         f"quantize on the source model")
    config = ModelConfig.from_dict(meta["config"], f"{where}: config")
    try:
        parsed = WeightFormat.parse(meta["format"])
        head = None if meta.get("head") is None else FPFormat.parse(meta["head"])
    except ValueError as err:
        raise ValueError(f"{where}: format: {err}") from None
    if parsed.head is not None:
        raise ValueError(f"{where}: format {meta['format']!r} names an lm_head format: that is the head field's")
    # a per-layer plan mixes plane widths: each layer's planes are then checked by shape as they are read
    _check_tensors(Path(model_dir), config, ("",), str(where), fmt=False if meta.get("plan") else parsed.quantized,
                   head=head)
    return meta


def packed_format(meta: dict, model_dir: Union[str, Path], fmt: Union[str, FPFormat, WeightFormat, None] = None,
                  group_size: Optional[int] = None, dtype: Optional[torch.dtype] = None, device=None) -> WeightFormat:
    """The WeightFormat of the packed checkpoint in model_dir (``meta``: its fp6llm.json), activations in dtype
    (default as WeightFormat.parse). fmt / group_size, if given, must be the checkpoint's: ValueError otherwise,
    naming both."""
    stored = None if meta.get("head") is None else FPFormat.parse(meta["head"])
    head = stored
    if fmt is not None:
        requested = WeightFormat.parse(fmt, dtype, device, group_size)
        if requested.body_name != meta["format"]:
            raise ValueError(f"{model_dir} is packed as {meta['format']}, not the requested {requested.body_name}")
        if stored is not None and requested.head not in (None, stored):
            raise ValueError(f"{model_dir} is packed with lm_head in {stored.name}, not the requested "
                             f"{requested.head.name}")
        dtype, group_size = requested.dtype, requested.group_size
        head = stored or requested.head  # a float lm_head is quantized at load
    if group_size is not None and group_size != meta.get("group_size"):
        raise ValueError(f"{model_dir} is packed with group_size={meta.get('group_size')}, not {group_size}")
    return replace(WeightFormat.parse(meta["format"], dtype, device, meta.get("group_size")), head=head)


def load_packed(model_dir: Union[str, Path], fmt: Union[str, FPFormat, WeightFormat, None] = None,
                group_size: Optional[int] = None, device=None, dtype: Optional[torch.dtype] = None,
                progress: bool = True, tp: Optional[TensorParallel] = None) -> nn.Module:
    """Load an fp6llm packed checkpoint (planes + scales as written by save_packed / quantize_checkpoint), with no
    re-quantization. fmt / group_size, if given, must match the checkpoint's (ValueError otherwise). tp: read only
    that tensor-parallel rank's slices of the planes and scales (models/parallel.py)."""
    meta = read_packed_meta(model_dir)
    weight_format = packed_format(meta, model_dir, fmt, group_size, dtype, device)
    config = ModelConfig.from_dict(meta["config"], str(Path(model_dir) / PACKED_META))
    checkpoint = SafetensorsCheckpoint(model_dir)
    try:
        source = PackedSource(checkpoint, weight_format, resolve_device(device), layout_version=meta["layout_version"])
        source.layer_plan = dict(meta.get("plan") or {})
        if meta.get("head") is not None:  # lm_head's planes, read as a Linear of its own format
            source.layer_plan[SKIP] = {"format": meta["head"], "group_size": None}
        return materialize(build_model(config, "meta"), source, progress, f"load packed {weight_format}", tp)
    finally:
        checkpoint.close()


def build_random(name_or_config: Union[str, ModelConfig],
                 fmt: Union[str, FPFormat, WeightFormat] = DEFAULT_FORMAT, device=None,
                 dtype: Optional[torch.dtype] = None, seed: int = 0, group_size: Optional[int] = None,
                 progress: bool = True, tp: Optional[TensorParallel] = None) -> nn.Module:
    """A model of a named (NAMED_CONFIGS) or given config with random weights (std 0.02), made on ``device`` one
    layer at a time and quantized as it goes: a llama-2-70b in FP6 never needs its FP16 size anywhere. tp: keep
    only that tensor-parallel rank's slices (each weight is made whole, then sliced: the same weights at any
    degree)."""
    config = name_or_config if isinstance(name_or_config, ModelConfig) else ModelConfig.from_name(name_or_config)
    weight_format = WeightFormat.parse(fmt, dtype, device, group_size)
    source = RandomSource(seed, weight_format, resolve_device(device))
    return materialize(build_model(config, "meta"), source, progress, f"random {weight_format}", tp)
