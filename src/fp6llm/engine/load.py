"""``load``: a model directory or "random:NAME" to a ready Engine, with the checks a user needs before a long load.

Before any weight is read the model's size is estimated from its config and format (a meta-device model, no
memory) and, on CUDA, compared with the free GPU memory: a model that cannot fit fails in a second, naming both
numbers, instead of after minutes of loading.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..formats import WeightFormat, resolve_device
from ..models import NAMED_CONFIGS, ModelConfig, build_random, load_hf
from ..models.checkpoint import TOKENIZER_FILES
from ..models.loader import PACKED_META, SKIP, build_model, packed_format, read_hf_config, read_packed_meta
from ..packing import padded_k, padded_n
from ..models.attention import BLOCK_SIZE
from ..models.parallel import TensorParallel, apply_tensor_parallel, local_config
from .generate import DEFAULT_GPU_MEMORY_UTILIZATION, DEFAULT_MAX_SEQ_LEN, Engine, default_num_blocks
from .tokenizer import ByteTokenizer, load_tokenizer

RANDOM_PREFIX = "random:"
# The embedded default model: a small Llama trained on the stdlib's source, pre-packed in FP6 (data/*/README.md).
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "data" / "stdlib-lm-e3m2"
SCALE_BYTES = 4  # float32 per-channel scales (group scales are float16 or float32; the estimate takes the larger)
GB = 1e9
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class DoesNotFit(MemoryError):
    """The model (weights + KV cache) needs more device memory than is free."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a directory, or a named config with random weights (``random_name``)."""

    path: Optional[Path] = None
    random_name: Optional[str] = None

    @classmethod
    def parse(cls, path_or_random: Union[str, Path, "ModelSource", None] = None) -> "ModelSource":
        """"random:NAME", a directory, or None for the embedded default model (DEFAULT_MODEL); a ModelSource comes
        back as it is. Raises ValueError for an unknown NAME (listing the names), FileNotFoundError /
        NotADirectoryError for a path that is not a directory."""
        if isinstance(path_or_random, ModelSource):
            return path_or_random
        text = str(DEFAULT_MODEL if path_or_random is None else path_or_random)
        if text.startswith(RANDOM_PREFIX):
            return cls.random(text[len(RANDOM_PREFIX):])
        path = Path(text).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model directory {path} does not exist")
        if not path.is_dir():
            raise NotADirectoryError(f"model path {path} is not a directory")
        return cls(path=path)

    @classmethod
    def random(cls, name: str) -> "ModelSource":
        if name not in NAMED_CONFIGS:
            raise ValueError(f"unknown random model {name!r}; valid names: {', '.join(NAMED_CONFIGS)}")
        return cls(random_name=name)

    @property
    def name(self) -> str:
        return f"{RANDOM_PREFIX}{self.random_name}" if self.random_name else str(self.path)

    def packed_meta(self) -> Optional[dict]:
        """fp6llm.json of a packed checkpoint; None for a Hugging Face directory or random weights."""
        packed = self.path is not None and (self.path / PACKED_META).is_file()
        return read_packed_meta(self.path) if packed else None

    def weight_format(self, fmt: Optional[str] = None, group_size: Optional[int] = None,
                      dtype: Optional[torch.dtype] = None, device=None) -> WeightFormat:
        """The WeightFormat the loaded model will have: a packed checkpoint's own, else fmt (default e3m2), with
        group_size and activations in dtype (default float16 on CUDA ``device``, float32 elsewhere).

        Raises ValueError for an unknown format, or a format or group size that a packed checkpoint does not hold.
        """
        meta = self.packed_meta()
        if meta is None:
            return WeightFormat.parse(fmt, dtype, device, group_size)
        return packed_format(meta, self.path, fmt, group_size, dtype, device)

    def config(self) -> ModelConfig:
        if self.random_name:
            return ModelConfig.from_name(self.random_name)
        meta = self.packed_meta()
        return read_hf_config(self.path) if meta is None else ModelConfig.from_dict(meta["config"])

    def tokenizer(self, config: ModelConfig):
        """The checkpoint's tokenizer; bytes for random weights (also when packed from random weights, which
        recorded no source and copied no tokenizer)."""
        meta = self.packed_meta()
        from_random = meta is not None and meta.get("source") is None and not any(
            (self.path / name).is_file() for name in TOKENIZER_FILES)
        if self.random_name or from_random:
            return ByteTokenizer(config.vocab_size)
        return load_tokenizer(self.path)

    def load_model(self, weight_format: WeightFormat, device=None, seed: int = 0, progress: bool = True,
                   tp: Optional[TensorParallel] = None) -> nn.Module:
        """The model in ``weight_format`` (see weight_format) on ``device``; tp: only that tensor-parallel rank's
        part. seed: of random weights."""
        if self.random_name:
            return build_random(self.random_name, weight_format, device, seed=seed, progress=progress, tp=tp)
        return load_hf(self.path, weight_format, device=device, progress=progress, tp=tp)


def weight_bytes(config: ModelConfig, fmt: Union[str, WeightFormat], dtype: Optional[torch.dtype] = None,
                 group_size: Optional[int] = None, tp: Optional[TensorParallel] = None) -> int:
    """Bytes of the model's weights in ``fmt`` (a WeightFormat, or its words for WeightFormat.parse: "fp16",
    "e3m2", ...), counted on a meta-device model; tp: of that tensor-parallel rank's part (ValueError as
    models.parallel.plan when the degree cannot split the model)."""
    weight_format = WeightFormat.parse(fmt, dtype, "cpu", group_size)
    quantized, dtype, group_size = weight_format.quantized, weight_format.dtype, weight_format.group_size
    model = build_model(config, "meta")
    if tp is not None:
        apply_tensor_parallel(model, tp.rank, tp.world_size)
    quantized_weights = set() if quantized is None else {
        id(module.weight) for name, module in model.named_modules() if isinstance(module, nn.Linear) and name != SKIP}

    def packed(param, fmt, group_size) -> int:
        n, k = param.shape
        groups = 1 if group_size is None else k // group_size
        return padded_n(n) * padded_k(k) * fmt.bits // 8 + n * groups * SCALE_BYTES

    head = model.lm_head.weight
    tied = any(param is head for name, param in model.named_parameters() if not name.startswith("lm_head."))
    total = 0
    for param in model.parameters():  # a tied weight appears once
        if id(param) in quantized_weights:
            total += packed(param, quantized, group_size)
        elif param is head and weight_format.head is not None and not tied:
            total += packed(param, weight_format.head, None)
        else:
            total += param.numel() * dtype.itemsize
    if weight_format.head is not None and tied:  # planes of its own beside the float embedding
        total += packed(head, weight_format.head, None)
    return total


def kv_cache_bytes(config: ModelConfig, batch_size: int, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes of the static K and V caches of every layer."""
    return 2 * config.n_layers * batch_size * config.n_kv_heads * seq_len * config.head_dim * dtype.itemsize


def require_memory(device, needs: dict, what: str) -> None:
    """On CUDA, raise DoesNotFit unless the bytes of ``needs`` ({part: bytes}) are free (torch.cuda.mem_get_info)."""
    device = resolve_device(device)
    if device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(device)
    needed = sum(needs.values())
    if needed > free:
        parts = " + ".join(f"{size / GB:.1f} GB {part}" for part, size in needs.items())
        raise DoesNotFit(f"{what} needs about {needed / GB:.1f} GB ({parts}) but {torch.cuda.get_device_name(device)} "
                         f"has {free / GB:.1f} GB free of {total / GB:.1f} GB")


def check_fits(config: ModelConfig, weight_format: WeightFormat, device, batch_size: int, seq_len: int,
               tp: Optional[TensorParallel] = None) -> None:
    """On CUDA, raise DoesNotFit unless weights + KV cache (tp: of that tensor-parallel rank) fit the free memory;
    call before loading."""
    rank_config = config if tp is None else local_config(config, tp)
    require_memory(device, {"weights": weight_bytes(config, weight_format, tp=tp),
                            f"KV cache of {batch_size} x {seq_len} positions":
                                kv_cache_bytes(rank_config, batch_size, seq_len, weight_format.dtype)},
                   f"the model in {weight_format}")


def load(path_or_random: Union[str, Path, None] = None, fmt: Optional[str] = None, group_size: Optional[int] = None,
         device=None, dtype: Optional[torch.dtype] = None, max_batch_size: int = 8, max_seq_len: Optional[int] = None,
         cuda_graph: bool = True, progress: bool = True, tp: Optional[TensorParallel] = None,
         gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION, tokenizer=None) -> Engine:
    """A ready Engine (``.generate(prompts, ...)``) for a model directory or "random:NAME".

    path_or_random: a Hugging Face checkpoint directory (quantized while loading), an fp6llm packed checkpoint
    (fp6llm.json), "random:NAME" with NAME in fp6llm.models.NAMED_CONFIGS (random weights, byte tokenizer), or a
    ModelSource. fmt: "e3m2" (FP6, the default; a packed checkpoint's own format), any eXmY, or "fp16" / "bf16" /
    "fp32" for unquantized weights; or a WeightFormat (then without group_size / dtype). device: default CUDA when
    available. dtype: activations, default float16 on CUDA and float32 elsewhere; a torch.dtype or its name.
    max_batch_size: sequences running at most; max_seq_len: positions of one (default min(max_position_embeddings,
    2048)). The paged KV cache holds max_batch_size x max_seq_len
    positions, on CUDA at most what gpu_memory_utilization of the GPU's memory leaves after the weights (requests
    are admitted by free blocks). tp: this process's tensor-parallel rank (engine.distributed.process_group): the
    engine runs that rank's slice of the model, and every rank must make the same engine calls (engine.mirror).
    tokenizer: the source's tokenizer when the caller has it already (``ModelSource.tokenizer``, read to check
    prompts before the model loads), so that it is not read twice; default: read here.
    Raises ValueError (unknown name or format), FileNotFoundError (no such directory, config or tokenizer),
    DoesNotFit (a MemoryError: weights + the cache of one sequence beyond the free GPU memory, both
    numbers said).
    """
    if isinstance(dtype, str):  # "float16", "bfloat16", "float32"
        dtype = DTYPES.get(dtype.removeprefix("torch."))
        if dtype is None:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or a torch.dtype")
    source = ModelSource.parse(path_or_random)
    device = resolve_device(device)
    weight_format = source.weight_format(fmt, group_size, dtype, device)
    config = source.config()
    tokenizer = source.tokenizer(config) if tokenizer is None else tokenizer
    seq_len = max_seq_len or min(config.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
    check_fits(config, weight_format, device, 1, seq_len, tp)  # the cache takes what is left, >= 1 sequence
    model = source.load_model(weight_format, device, progress=progress, tp=tp)
    weight = next(p for p in model.parameters() if p.is_floating_point())
    blocks = default_num_blocks(model, weight.device, weight.dtype, max_batch_size, seq_len, BLOCK_SIZE,
                                gpu_memory_utilization)
    if tp is not None and tp.world_size > 1:  # every rank's batcher must decide alike: the fewest blocks of any
        import torch.distributed as dist

        count = torch.tensor([blocks], device=weight.device)
        dist.all_reduce(count, op=dist.ReduceOp.MIN, group=tp.group)
        blocks = int(count.item())
    return Engine(model, tokenizer, max_batch_size, max_seq_len, cuda_graph, num_blocks=blocks)
