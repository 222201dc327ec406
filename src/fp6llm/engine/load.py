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

from ..models import NAMED_CONFIGS, ModelConfig, build_random, load_hf
from ..models.loader import (PACKED_META, SKIP, build_model, read_hf_config, read_packed_meta, resolve_format)
from ..packing import padded_k
from .generate import DEFAULT_MAX_SEQ_LEN, Engine
from .tokenizer import ByteTokenizer, load_tokenizer

RANDOM_PREFIX = "random:"
SCALE_BYTES = 4  # float32 per-channel scales (group scales are float16 or float32; the estimate takes the larger)
GB = 1e9


class DoesNotFit(MemoryError):
    """The model (weights + KV cache) needs more device memory than is free."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a directory, or a named config with random weights (``random_name``)."""

    path: Optional[Path] = None
    random_name: Optional[str] = None

    @classmethod
    def parse(cls, path_or_random: Union[str, Path]) -> "ModelSource":
        """"random:NAME" or a directory. Raises ValueError for an unknown NAME (listing the names),
        FileNotFoundError / NotADirectoryError for a path that is not a directory."""
        text = str(path_or_random)
        if text.startswith(RANDOM_PREFIX):
            return cls.random(text[len(RANDOM_PREFIX):])
        path = Path(text).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model directory {path} does not exist (for random weights use "
                                    f"random:NAME, NAME one of {', '.join(NAMED_CONFIGS)})")
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

    def config(self) -> ModelConfig:
        if self.random_name:
            return ModelConfig.from_name(self.random_name)
        if (self.path / PACKED_META).is_file():
            return ModelConfig.from_dict(read_packed_meta(self.path)["config"])
        return read_hf_config(self.path)

    def tokenizer(self, config: ModelConfig):
        """The checkpoint's tokenizer; bytes for random weights."""
        return ByteTokenizer(config.vocab_size) if self.random_name else load_tokenizer(self.path)

    def load_model(self, fmt: str = "e3m2", group_size: Optional[int] = None, device=None,
                   dtype: Optional[torch.dtype] = None, seed: int = 0, progress: bool = True) -> nn.Module:
        if self.random_name:
            return build_random(self.random_name, fmt, device, dtype, seed, group_size, progress)
        return load_hf(self.path, fmt, group_size, device, dtype, progress)


def check_format(fmt: str) -> str:
    """``fmt`` if it names a format (eXmY, fp6/fp5/fp4) or unquantized weights (fp16/bf16/fp32); else ValueError."""
    try:
        resolve_format(fmt, None, "cpu")
    except ValueError as err:
        raise ValueError(f"{err}, or fp16 / bf16 / fp32 for unquantized weights") from None
    return fmt


def weight_bytes(config: ModelConfig, fmt: str, dtype: Optional[torch.dtype] = None,
                 group_size: Optional[int] = None) -> int:
    """Bytes of the model's weights in ``fmt`` ("fp16", "e3m2", ...), counted on a meta-device model."""
    quantized, dtype, _ = resolve_format(fmt, dtype, "cpu", group_size)
    model = build_model(config, "meta")
    quantized_weights = set() if quantized is None else {
        id(module.weight) for name, module in model.named_modules() if isinstance(module, nn.Linear) and name != SKIP}
    total = 0
    for param in model.parameters():  # a tied weight appears once
        if id(param) in quantized_weights:
            n, k = param.shape
            groups = 1 if group_size is None else k // group_size
            total += n * padded_k(k) * quantized.bits // 8 + n * groups * SCALE_BYTES
        else:
            total += param.numel() * dtype.itemsize
    return total


def kv_cache_bytes(config: ModelConfig, batch_size: int, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes of the static K and V caches of every layer."""
    return 2 * config.n_layers * batch_size * config.n_kv_heads * seq_len * config.head_dim * dtype.itemsize


def check_fits(config: ModelConfig, fmt: str, group_size: Optional[int], device, dtype: Optional[torch.dtype],
               batch_size: int, seq_len: int) -> None:
    """On CUDA, raise DoesNotFit unless weights + KV cache fit the free memory (torch.cuda.mem_get_info)."""
    _, dtype, device = resolve_format(fmt, dtype, device, group_size)
    if device.type != "cuda":
        return
    weights = weight_bytes(config, fmt, dtype, group_size)
    cache = kv_cache_bytes(config, batch_size, seq_len, dtype)
    free, total = torch.cuda.mem_get_info(device)
    if weights + cache > free:
        raise DoesNotFit(f"the model in {fmt} needs about {(weights + cache) / GB:.1f} GB ({weights / GB:.1f} GB "
                         f"weights + {cache / GB:.1f} GB KV cache for {batch_size} x {seq_len} positions) but "
                         f"{torch.cuda.get_device_name(device)} has {free / GB:.1f} GB free of {total / GB:.1f} GB")


def load(path_or_random: Union[str, Path], fmt: str = "e3m2", group_size: Optional[int] = None, device=None,
         dtype: Optional[torch.dtype] = None, max_batch_size: int = 8, max_seq_len: Optional[int] = None,
         cuda_graph: bool = True, progress: bool = True) -> Engine:
    """A ready Engine (``.generate(prompts, ...)``) for a model directory or "random:NAME".

    path_or_random: a Hugging Face checkpoint directory (quantized while loading), an fp6llm packed checkpoint
    (fp6llm.json), or "random:NAME" with NAME in fp6llm.models.NAMED_CONFIGS (random weights, byte tokenizer).
    fmt: "e3m2" (FP6), any eXmY, or "fp16" / "bf16" / "fp32" for unquantized weights. device: default CUDA when
    available. dtype: activations, default float16 on CUDA and float32 elsewhere. max_batch_size x max_seq_len:
    the KV cache (max_seq_len defaults to min(max_position_embeddings, 2048)).
    Raises ValueError (unknown name or format), FileNotFoundError (no such directory, config or tokenizer),
    DoesNotFit (a MemoryError: weights + cache beyond the free GPU memory, both numbers said).
    """
    source = ModelSource.parse(path_or_random)
    check_format(fmt)
    config = source.config()
    tokenizer = source.tokenizer(config)
    seq_len = max_seq_len or min(config.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
    check_fits(config, fmt, group_size, device, dtype, max_batch_size, seq_len)
    model = source.load_model(fmt, group_size, device, dtype, progress=progress)
    return Engine(model, tokenizer, max_batch_size, max_seq_len, cuda_graph)
