"""Perplexity of each format on a text, and how often its argmax token agrees with the unquantized reference's.

The text is cut into non-overlapping windows of ``ctx`` tokens; each window is scored from its own start (its first
token predicts nothing), so a window's predictions see 1 .. ctx - 1 tokens of context. The reference (fp16 on CUDA,
float32 on a CPU, where half-precision matmuls are slow and not what a GPU computes) runs first; every format's
argmax is compared with the reference's at the same positions. A packed checkpoint holds no float weights: its own
format is the reference, the other formats re-quantize its de-quantized weights, and unquantized formats (which
would be the reference again) are left out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..formats import WeightFormat, resolve_device
from ..engine.load import GB, ModelSource, check_fits
from ..engine.runner import drop_caches
from .throughput import free_memory, load_as, measured_as, model_bytes, row_label

REFERENCE = "fp16"


@dataclass
class EvalRow:
    format: str
    weight_gb: float
    perplexity: float
    nll: float
    argmax_agreement: float
    tokens: int


def windows(ids: list, ctx: int, max_tokens: Optional[int] = None) -> torch.Tensor:
    """int64 [n, ctx]: the first max_tokens ids (all by default) in whole windows. ValueError if not one fits."""
    ids = ids[:max_tokens] if max_tokens else ids
    count = len(ids) // ctx
    if ctx < 2 or count == 0:
        raise ValueError(f"the text has {len(ids)} tokens{' (after --max-tokens)' if max_tokens else ''}: not "
                         f"enough for one window of ctx={ctx} tokens (ctx must be >= 2)")
    return torch.tensor(ids[:count * ctx]).view(count, ctx)


def encode_long(tokenizer, text: str) -> list:
    """The ids of a whole text, without transformers' warning that they pass the model's length: eval cuts them
    into windows."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # a bare tokenizers.Tokenizer or bytes: no such warning
        return tokenizer.encode(text)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return tokenizer.encode(text)
    finally:
        hf_logging.set_verbosity(verbosity)


@torch.inference_mode()
def score(model, tokens: torch.Tensor, batch_size: int = 4, progress: bool = False, desc: str = "score") -> tuple:
    """(summed negative log-likelihood, argmax predictions int64 [n, ctx - 1]) of the windows ``tokens`` [n, ctx]."""
    device = next(p for p in model.parameters() if p.is_floating_point()).device
    n, ctx = tokens.shape
    model.setup_caches(min(batch_size, n), ctx, device=device)
    nll, predictions = 0.0, []
    try:
        for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress):
            rows = tokens[start:start + batch_size].to(device)
            positions = torch.arange(ctx, device=device).expand(rows.shape[0], -1)
            logits = model(rows, positions)[:, :-1]
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1),
                                   reduction="sum").item()
            predictions.append(logits.argmax(dim=-1).cpu())
    finally:
        drop_caches(model)
    return nll, torch.cat(predictions)


def run_eval(source: ModelSource, formats: list, text: str, ctx: int = 512, max_tokens: Optional[int] = None,
             device=None, group_size: Optional[int] = None, batch_size: int = 4, progress: bool = True) -> dict:
    """{"setup": {...}, "rows": [EvalRow dicts]}: the reference first, then each other format of ``formats``
    (WeightFormats or their names: WeightFormat.parse_list, group_size is the quantized ones')."""
    device = resolve_device(device)
    requested = WeightFormat.parse_list(formats, group_size, device)
    config = source.config()
    if ctx > config.max_position_embeddings:
        raise ValueError(f"ctx {ctx} is beyond the model's max_position_embeddings {config.max_position_embeddings}")
    tokens = windows(encode_long(source.tokenizer(config), text), ctx, max_tokens)
    meta = source.packed_meta()
    first, = WeightFormat.parse_list([REFERENCE if meta is None else meta["format"]], group_size, device)
    reference = measured_as(first, device)
    left_out = [] if meta is None else [f.name for f in requested if f.quantized is None]
    order = [first] + [f for f in dict.fromkeys(requested) if f.name != first.name and f.name not in left_out]
    rows, reference_argmax = [], None
    for weight_format in order:
        measured = reference if weight_format is first else weight_format
        cast = "" if measured == weight_format else f"as {measured}"
        check_fits(config, measured, device, batch_size, ctx)
        model, derived = load_as(source, measured, device=device, progress=progress)
        label = row_label(weight_format.name, cast, derived)
        try:
            weights = model_bytes(model)
            nll, argmax = score(model, tokens, batch_size, progress, f"eval {label}")
        finally:
            del model
            free_memory(device)
        if reference_argmax is None:
            reference_argmax = argmax
        count = argmax.numel()
        rows.append(EvalRow(label, weights / GB, math.exp(nll / count), nll / count,
                            (argmax == reference_argmax).float().mean().item(), count))
    setup = {"model": source.name, "device": str(device), "ctx": ctx, "windows": tokens.shape[0],
             "predicted_tokens": tokens.shape[0] * (ctx - 1), "reference": reference.name, "group_size": group_size,
             "packed": None if meta is None else meta["format"], "left_out": left_out}
    return {"setup": setup, "rows": [asdict(row) for row in rows]}


def format_table(result: dict) -> str:
    s = result["setup"]
    if s.get("packed"):
        reference = (f"{s['reference']}, the packed checkpoint's own weights (it holds no float ones; other formats "
                     f"re-quantize them{'; left out: ' + ', '.join(s['left_out']) if s['left_out'] else ''})")
    else:
        reference = s["reference"] + (" (fp16 runs in float32 on a CPU)" if s["reference"] != REFERENCE else "")
    lines = [f"{s['model']} on {s['device']}: {s['windows']} windows of {s['ctx']} tokens, {s['predicted_tokens']} "
             f"predictions; reference {reference}",
             f"{'format':16} {'weight GB':>9} {'perplexity':>11} {'nll/token':>10} {'argmax = ref':>12}"]
    for r in result["rows"]:
        lines.append(f"{r['format']:16} {r['weight_gb']:9.3f} {r['perplexity']:11.4f} {r['nll']:10.5f} "
                     f"{r['argmax_agreement']:12.4f}")
    return "\n".join(lines)
