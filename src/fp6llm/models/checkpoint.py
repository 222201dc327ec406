"""fp6llm packed checkpoints: safetensors shards of FPxLinear buffers ("<module>.plane0", "<module>.plane1",
"<module>.scales", "<module>.bias") and the unquantized tensors (norms, embeddings, lm_head) under our module names,
plus fp6llm.json (format, group size, layout version, source, fp6llm version, the ModelConfig; "head": lm_head's
format where it is stored quantized, per-channel, as "lm_head.planeI" / ".scales") and the source's tokenizer
files. load_hf / load_packed read them back with no re-quantization.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import save_file
from torch import nn

from .. import package_version
from ..formats import FPFormat, WeightFormat, resolve_device
from ..nn import FPxLinear
from ..packing import LAYOUT_VERSION
from ..quantize import quantize_weight
from .config import ModelConfig
from .loader import (INDEX_FILE, PACKED_META, SINGLE_FILE, HFSource, SafetensorsCheckpoint, build_model,
                     read_hf_config, stream_modules)

MAX_SHARD_BYTES = 2 * 10**9
# The files a checkpoint's tokenizer may consist of (what transformers' AutoTokenizer reads): a packed checkpoint
# gets copies of those its source has, and a directory with none of them has no tokenizer (engine.load_tokenizer).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")
# Copied with them: the EOS ids (generation_config.json) and the model type AutoTokenizer may look up (config.json).
COPIED_FILES = TOKENIZER_FILES + ("generation_config.json", "config.json")


class ShardWriter:
    """Collects tensors and writes a safetensors shard whenever the next tensor would pass max_shard_bytes.

    ``close`` names the shards as Hugging Face does (model-00001-of-00003.safetensors + model.safetensors.index.json,
    or a single model.safetensors) and returns (tensors written, bytes written, number of shards).
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int = MAX_SHARD_BYTES):
        self.out_dir, self.max_shard_bytes = out_dir, max_shard_bytes
        self.pending, self.pending_bytes, self.shards, self.weight_map, self.total_bytes = {}, 0, [], {}, 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.out_dir / f"shard-{len(self.shards) + 1:05d}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> tuple[int, int, int]:
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        names = [SINGLE_FILE] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors"
                                                  for i in range(1, count + 1)]
        for (path, tensors), name in zip(self.shards, names, strict=True):
            path.replace(self.out_dir / name)
            self.weight_map.update(dict.fromkeys(tensors, name))
        index = self.out_dir / INDEX_FILE
        if count == 1:
            index.unlink(missing_ok=True)  # a stale index would be read before model.safetensors
        else:
            index.write_text(json.dumps({"metadata": {"total_size": self.total_bytes},
                                         "weight_map": self.weight_map}, indent=2))
        return len(self.weight_map), self.total_bytes, count


def copy_tokenizer_files(src_dir: Union[str, Path], out_dir: Union[str, Path]) -> list[str]:
    """Copy the tokenizer / generation / config files that exist in src_dir; returns their names."""
    copied = [name for name in COPIED_FILES if (Path(src_dir) / name).is_file()]
    for name in copied:
        shutil.copy2(Path(src_dir) / name, Path(out_dir) / name)
    return copied


def _write_meta(out_dir: Path, format_name: str, group_size: Optional[int], config: ModelConfig, source,
                plan: Optional[dict] = None, head: Optional[FPFormat] = None) -> None:
    meta = {"format": format_name, "group_size": group_size, "layout_version": LAYOUT_VERSION,
            "source": None if source is None else str(source), "fp6llm_version": package_version(),
            "config": config.to_dict()}  # fp6llm_version null from a source tree never installed, not a guess
    if head is not None:  # lm_head's own format (per-channel): its planes are stored as lm_head.planeI / .scales
        meta["head"] = head.name
    if plan:  # per-layer formats (fp6llm.evals.plan); format / group_size are then the other layers' (none)
        meta["plan"] = plan
    (out_dir / PACKED_META).write_text(json.dumps(meta, indent=2) + "\n")


def _model_format(model: nn.Module) -> tuple[str, Optional[int]]:
    """(format name, group size) of a model's FPxLinear layers but lm_head, or its weight dtype's name if none is
    quantized."""
    kinds = {(m.fmt.name, m.group_size) for name, m in model.named_modules()
             if isinstance(m, FPxLinear) and name != "lm_head"}
    if len(kinds) > 1:
        raise ValueError(f"a packed checkpoint holds one format and group size; the model mixes {sorted(kinds)}")
    if kinds:
        return kinds.pop()
    return WeightFormat.float_weights(model.embed_tokens.weight.dtype).name, None


def save_packed(model: nn.Module, out_dir: Union[str, Path], source: Union[str, Path, None] = None,
                max_shard_bytes: int = MAX_SHARD_BYTES) -> dict:
    """Write a model (from load_hf or build_random) as a packed checkpoint in out_dir.

    source: the directory it came from, recorded in fp6llm.json and whose tokenizer files are copied. Returns a
    summary dict (tensors, bytes_out, shards). Raises ValueError for a model that mixes formats or whose lm_head is
    quantized (a "+head=" format: packed checkpoints keep lm_head float).
    """
    out_dir = Path(out_dir)
    format_name, group_size = _model_format(model)
    head = _head_format(model.lm_head, format_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out_dir, max_shard_bytes)
    for name, tensor in model.state_dict().items():
        if not (model.config.tie_word_embeddings and name == "lm_head.weight"):
            writer.add(name, tensor)
    tensors, bytes_out, shards = writer.close()
    if source is not None:
        copy_tokenizer_files(source, out_dir)
    _write_meta(out_dir, format_name, group_size, model.config, source, head=head)
    return {"tensors": tensors, "bytes_out": bytes_out, "shards": shards}


def _head_format(lm_head: nn.Module, body: str) -> Optional[FPFormat]:
    """The FPFormat of a quantized lm_head (None for a float one); ValueError for one a packed checkpoint cannot
    hold: beside float weights, or with group scales."""
    if not isinstance(lm_head, FPxLinear):
        return None
    if WeightFormat.is_float(body):
        raise ValueError(f"a packed checkpoint of {body} weights keeps lm_head float, not {lm_head.fmt.name}")
    if lm_head.group_size is not None:
        raise ValueError(f"a packed checkpoint stores lm_head with per-channel scales, not group_size="
                         f"{lm_head.group_size}")
    return lm_head.fmt


def _source_dtype(src_dir: Path) -> Optional[str]:
    """torch_dtype of a Hugging Face config.json ("float32", "bfloat16", ...), None if it names none."""
    hf = json.loads((src_dir / "config.json").read_text())
    return hf.get("torch_dtype") or hf.get("dtype")


def quantize_checkpoint(src_dir: Union[str, Path], out_dir: Union[str, Path],
                        fmt: Union[str, FPFormat, WeightFormat] = "e3m2",
                        group_size: Optional[int] = None, device="cpu", max_shard_bytes: int = MAX_SHARD_BYTES,
                        progress: bool = True, dtype: Optional[torch.dtype] = None,
                        plan: Optional[dict] = None) -> dict:
    """Quantize a Hugging Face safetensors model directory into a packed checkpoint, streaming: one module's
    tensors are read, quantized (on ``device``) and queued for the current shard at a time, so memory holds at most
    one shard plus one weight. The tensors that stay unquantized (embeddings, lm_head, norms, biases) are stored
    in ``dtype``: default the activations' float16, or bfloat16 when the source's config.json says torch_dtype
    bfloat16 (so an fp32 source does not make an FP6 checkpoint larger than its fp16 one); torch.float32 keeps them.

    plan: {module name: {"format", "group_size", "scale_search"}} gives those Linears their own format (a
    per-layer plan, stored in fp6llm.json and read back by load_packed); fmt / group_size cover the others.
    Returns {"tensors", "bytes_in", "bytes_out", "shards", "seconds", "format", "group_size"}. Raises what load_hf
    raises for a bad source, and ValueError if src_dir is already packed or out_dir is src_dir.
    """
    start = time.perf_counter()
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    weight_format = WeightFormat.parse(fmt, None, device, group_size)
    head = weight_format.head
    if head is not None and weight_format.quantized is None:
        raise ValueError(f"{weight_format}: a packed checkpoint of {weight_format.body_name} weights keeps lm_head "
                         f"float (quantize the body too, e.g. --format e3m2+head={head.name})")
    if (src_dir / PACKED_META).is_file():
        raise ValueError(f"{src_dir} is already an fp6llm packed checkpoint")
    if out_dir.exists() and out_dir.resolve() == src_dir.resolve():
        raise ValueError(f"the output directory must differ from the source ({src_dir})")
    config = read_hf_config(src_dir)
    if weight_format.quantized is None:  # unquantized ("fp16" etc.): the format is the dtype
        dtype = weight_format.dtype
    elif dtype is None:
        dtype = torch.bfloat16 if _source_dtype(src_dir) == "bfloat16" else torch.float16
    checkpoint = SafetensorsCheckpoint(src_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out_dir, max_shard_bytes)
    try:
        source = HFSource(checkpoint, config.arch, replace(weight_format, dtype=dtype), resolve_device(device))
        source.layer_plan = plan or {}
        source.head = None  # lm_head is quantized here, as it streams (or from the embedding it is tied to)
        embedding = None
        for name, module in stream_modules(build_model(config, "meta"), source, progress, "quantize"):
            if name == "embed_tokens":
                embedding = module.weight.detach()
            if name == "lm_head" and head is not None:
                module = FPxLinear(quantize_weight(module.weight.detach(), head),
                                   None if module.bias is None else module.bias.detach())
            for key, tensor in module.state_dict(prefix=f"{name}.").items():
                writer.add(key, tensor)
        if head is not None and config.tie_word_embeddings:  # planes of its own: the embedding stays float
            for key, tensor in FPxLinear(quantize_weight(embedding, head), None).state_dict(prefix="lm_head.").items():
                writer.add(key, tensor)
    finally:
        checkpoint.close()
    tensors, bytes_out, shards = writer.close()
    copy_tokenizer_files(src_dir, out_dir)
    _write_meta(out_dir, weight_format.body_name, weight_format.group_size, config, src_dir.resolve(), plan, head)
    return {"tensors": tensors, "bytes_in": checkpoint.bytes_read, "bytes_out": bytes_out, "shards": shards,
            "seconds": time.perf_counter() - start, "format": weight_format.name,
            "group_size": weight_format.group_size}
