"""Checks of a checkpoint, which is untrusted input, before anything is built from it.

A config's sizes are checked against the tensors present (their shapes come from the safetensors headers, no data
is read): a config.json saying 10**6 layers fails in a millisecond instead of building modules for hours. A packed
checkpoint's fp6llm.json is checked against its planes (6-bit planes declared as a 4-bit format would load and
give garbage), and each scale read is finite and > 0. Every error is one line naming the file and the field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from ..formats import FPFormat
from ..packing import plane_widths
from .config import ModelConfig

LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")  # "model.layers.3.mlp..." (Llama), "model.decoder.layers.3..." (OPT)
PLANE = re.compile(r"^(.*)\.plane(\d+)$")


def check_config_tensors(config: ModelConfig, names: Iterable[str], shape: Callable[[str], tuple],
                         prefixes: tuple, where: str, field_names: Optional[dict] = None) -> None:
    """ValueError unless the checkpoint holds exactly ``config.n_layers`` layers and an embedding table of
    [vocab_size, word_embed_proj_dim].

    names: every tensor's name; shape(name): its shape; prefixes: where our module names sit among them ("model."
    in a Hugging Face Llama, "" in a packed checkpoint); where: the config's file, named in the error, with its
    fields as ``field_names`` ({our name: the file's}) spells them. The other tensors' shapes are checked as they
    are read.
    """
    names = set(names)
    field = (field_names or {}).get
    embed = next((p + "embed_tokens.weight" for p in prefixes if p + "embed_tokens.weight" in names), None)
    # only the decoder's layers count: a multimodal checkpoint's vision tower has layers of its own
    scope = "" if embed is None else embed.removesuffix("embed_tokens.weight")
    layers = {int(found[1]) for name in names if name.startswith(scope) and (found := LAYER.search(name))}
    present = max(layers) + 1 if layers else 0
    if present != config.n_layers:
        raise ValueError(f"{where}: {field('n_layers', 'n_layers')}={config.n_layers}, but the checkpoint's "
                         f"tensors hold {present} layers")
    if embed is None:
        raise ValueError(f"{where}: the checkpoint has no embedding table ({prefixes[0]}embed_tokens.weight)")
    expected = (config.vocab_size, config.word_embed_proj_dim)
    width = "word_embed_proj_dim" if config.word_embed_proj_dim != config.dim else field("dim", "dim")
    if tuple(shape(embed)) != expected:
        raise ValueError(f"{where}: vocab_size={config.vocab_size} and {width}={config.word_embed_proj_dim} do not "
                         f"match the tensor {embed} of shape {tuple(shape(embed))}")


def check_packed_meta(meta, where: str) -> None:
    """ValueError unless fp6llm.json's fields have their types: format a name, group_size None or an int > 0,
    config an object (the config's own fields are checked by ModelConfig.from_dict)."""
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: must be a JSON object, got {type(meta).__name__}")
    for key in ("format", "config"):
        if key not in meta:
            raise ValueError(f"{where}: missing field {key!r}")
    if not isinstance(meta["format"], str):
        raise ValueError(f"{where}: format={meta['format']!r} is not a format name")
    group_size = meta.get("group_size")
    if group_size is not None and not (type(group_size) is int and group_size > 0):
        raise ValueError(f"{where}: group_size={group_size!r} is not null or an integer > 0")
    head = meta.get("head")
    if head is not None and not isinstance(head, str):
        raise ValueError(f"{where}: head={head!r} is not null or a format name")


def check_planes(fmt: Optional[FPFormat], names: Iterable[str], shape: Callable[[str], tuple], where: str) -> None:
    """ValueError unless every quantized weight has exactly the planes of ``fmt`` (None: unquantized, no planes),
    in the ratio of their widths (plane i's words per row / plane 0's = width i / width 0)."""
    widths = () if fmt is None else plane_widths(fmt.bits)
    planes: dict = {}
    for name in names:
        found = PLANE.match(name)
        if found:
            planes.setdefault(found[1], {})[int(found[2])] = name
    described = f"{fmt.name} (planes of widths {widths})" if fmt is not None else "unquantized weights (no planes)"
    for module, by_index in sorted(planes.items()):
        if sorted(by_index) != list(range(len(widths))):
            raise ValueError(f"{where}: declares {described}, but {module} has planes "
                             f"{', '.join(map(str, sorted(by_index)))}")
        words = [shape(by_index[i])[-1] for i in range(len(widths))]
        for i, width in enumerate(widths):
            if words[i] * widths[0] != words[0] * width:
                raise ValueError(f"{where}: declares {described}, but {module}.plane{i} has {words[i]} words a row "
                                 f"against plane0's {words[0]}")


def check_scales(name: str, scales: torch.Tensor, where: str) -> None:
    """ValueError unless every scale is finite and > 0 (naming the tensor and a bad value)."""
    bad = ~(torch.isfinite(scales) & (scales > 0))
    if bool(bad.any()):
        raise ValueError(f"{where}: {name} holds the scale {scales[bad][0].item()} (scales must be finite and > 0)")


def read_json(path) -> object:
    """The JSON value in file ``path``; ValueError naming the file when it is not JSON (NaN / Infinity included)."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=refuse)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{path} is not valid JSON: {err}") from None
