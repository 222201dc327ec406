"""Perplexity, KL divergence and argmax agreement of fake-quantized causal LMs against their float model.

The model is a transformers causal LM in float32 on the CPU (a converted GGUF or any Hugging Face directory), so
that every architecture transformers knows (Llama, Gemma-3, ...) is measured the same way. A method (baselines.py)
replaces each linear layer's weight (all but lm_head, which in the models here is tied to the embedding) by its
de-quantized value; activations stay float32. The float model runs first; its next-token log-probabilities are
kept (float16) so that each method's KL(float || method) is exact up to that rounding.

Text: CPython's own documentation, ``pydoc_data.topics`` (on every machine with Python, ~1 MB of English), topics in
sorted order. Evaluation windows come from the end of the text and calibration windows (the plan's sensitivities)
from its start, so the two never overlap.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .baselines import Method

SKIP = ("lm_head",)


def pydoc_text() -> str:
    """The text of every pydoc topic (``pydoc_data.topics.topics``), sorted by topic name, blank-line separated."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[name] for name in sorted(topics))


def text_windows(tokenizer, text: str, ctx: int, count: int, from_end: bool = True) -> torch.Tensor:
    """int64 [count, ctx]: consecutive windows of the tokenized text, the last ``count`` (from_end) or the first.

    A tokenizer that starts every text with a BOS token (Gemma's; a model trained so degrades badly without it)
    gets BOS + ctx - 1 text tokens per window; others (SmolLM2's) ctx text tokens. Raises ValueError when the text
    is too short or ctx < 2.
    """
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    span = ctx - 1 if adds_bos else ctx
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if ctx < 2 or count < 1 or len(ids) < span * count:
        raise ValueError(f"the text has {len(ids)} tokens: not enough for {count} window(s) of ctx={ctx} (ctx >= 2)")
    ids = ids[len(ids) - span * count:] if from_end else ids[:span * count]
    windows = torch.tensor(ids).view(count, span)
    return torch.cat([torch.full((count, 1), bos), windows], dim=1) if adds_bos else windows


def load_causal_lm(path: Union[str, Path]):
    """(transformers model in float32 eval mode on the CPU, its tokenizer) from a local directory, no Hub access."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {path} (convert a GGUF file first: fp6llm convert-gguf)")
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    return model.eval(), tokenizer


def quantizable_linears(model: nn.Module, skip: Iterable[str] = SKIP) -> dict[str, nn.Linear]:
    """name -> nn.Linear for every linear layer but those whose last name part is in ``skip``."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in skip}


class FakeQuantizer:
    """Swaps the weights of a model's linear layers for de-quantized ones and back (the float ones kept on the side).

    ``apply({name: Method})`` quantizes those layers (others stay float); ``restore()`` puts every float weight back.
    """

    def __init__(self, model: nn.Module, skip: Iterable[str] = SKIP):
        self.linears = quantizable_linears(model, skip)
        self.originals = {name: m.weight.detach().clone() for name, m in self.linears.items()}

    def apply(self, methods: dict) -> float:
        """Quantize each named layer with its Method; returns the bits per weight over the quantized layers."""
        bits = weights = 0.0
        for name, method in methods.items():
            original = self.originals[name]
            with torch.no_grad():
                self.linears[name].weight.copy_(method.fake_quantize(original))
            bits += method.bits_per_weight(original.shape[1]) * original.numel()
            weights += original.numel()
        return bits / max(weights, 1)

    def uniform(self, method: Method) -> float:
        return self.apply(dict.fromkeys(self.linears, method))

    def restore(self) -> None:
        with torch.no_grad():
            for name, original in self.originals.items():
                self.linears[name].weight.copy_(original)


@torch.inference_mode()
def next_token_logprobs(model: nn.Module, windows: torch.Tensor, batch_size: int = 2) -> torch.Tensor:
    """float32 log-softmax of the model's logits at every position but the last: [n, ctx - 1, vocab]."""
    out = []
    for start in range(0, len(windows), batch_size):
        logits = model(input_ids=windows[start:start + batch_size], use_cache=False).logits[:, :-1]
        out.append(F.log_softmax(logits.float(), dim=-1))
    return torch.cat(out)


@dataclass
class QualityRow:
    """One method on one model: bits per weight (scales included), perplexity, KL to float, top-1 agreement."""

    method: str
    bits_per_weight: float
    perplexity: float
    nll: float
    kl: float
    argmax_agreement: float
    tokens: int
    seconds: float


class Reference:
    """The float model's predictions on ``windows``: targets, argmax and float16 log-probs for KL."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int = 2):
        self.windows, self.batch_size = windows, batch_size
        start = time.perf_counter()
        logprobs = next_token_logprobs(model, windows, batch_size)
        self.targets = windows[:, 1:]
        self.argmax = logprobs.argmax(dim=-1)
        self.nll = float(-logprobs.gather(-1, self.targets[..., None]).mean())
        self.logprobs = logprobs.half()
        self.seconds = time.perf_counter() - start

    def compare(self, model: nn.Module, label: str, bits: float) -> QualityRow:
        """Score ``model`` (usually the same one with quantized weights) against the float predictions."""
        start = time.perf_counter()
        nll = kl = agree = 0.0
        for first in range(0, len(self.windows), self.batch_size):
            rows = slice(first, first + self.batch_size)
            logprobs = next_token_logprobs(model, self.windows[rows], self.batch_size)
            ref = self.logprobs[rows].float()
            nll -= float(logprobs.gather(-1, self.targets[rows][..., None]).sum())
            kl += float((ref.exp() * (ref - logprobs)).sum())
            agree += float((logprobs.argmax(dim=-1) == self.argmax[rows]).sum())
        count = self.targets.numel()
        return QualityRow(label, bits, math.exp(nll / count), nll / count, kl / count, agree / count, count,
                          time.perf_counter() - start)

    def float_row(self) -> QualityRow:
        count = self.targets.numel()
        return QualityRow("float32", 32.0, math.exp(self.nll), self.nll, 0.0, 1.0, count, self.seconds)


def uniform_table(model: nn.Module, windows: torch.Tensor, methods: Iterable["str | Method"], batch_size: int = 2,
                  progress: bool = False, reference: Optional[Reference] = None) -> list[QualityRow]:
    """The float row, then one row per method applied to every linear layer (lm_head excluded).

    Raises ValueError for a method that does not parse or whose group size does not divide a layer's K.
    """
    methods = [Method.parse(m) for m in methods]
    reference = reference or Reference(model, windows, batch_size)
    quantizer = FakeQuantizer(model)
    rows = [reference.float_row()]
    try:
        for method in tqdm(methods, desc="methods", unit="method", disable=not progress):
            bits = quantizer.uniform(method)
            rows.append(reference.compare(model, method.name, bits))
            quantizer.restore()
    finally:
        quantizer.restore()
    return rows


def format_rows(rows: list[QualityRow], float_perplexity: Optional[float] = None) -> str:
    """An aligned text table; the perplexity change is against the first row (float) unless given."""
    base = float_perplexity or rows[0].perplexity
    lines = [f"{'method':18} {'bits/w':>6} {'perplexity':>10} {'vs float':>8} {'KL':>8} {'argmax':>7} {'s':>6}"]
    for r in rows:
        lines.append(f"{r.method:18} {r.bits_per_weight:6.3f} {r.perplexity:10.3f} "
                     f"{100 * (r.perplexity / base - 1):+7.2f}% {r.kl:8.5f} {100 * r.argmax_agreement:6.2f}% "
                     f"{r.seconds:6.1f}")
    return "\n".join(lines)
