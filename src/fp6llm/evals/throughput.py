"""End-to-end throughput per format and batch size: prefill and decode through the Engine, against the copy floor.

One process measures everything it compares: the device's copy bandwidth, then each format's model (built, measured
at every batch size, freed before the next). A decode step's floor is the time to read the bytes it must read once
at copy bandwidth: the weights (less the embedding tables, of which a step reads B rows) plus the KV cache entries
of every row's context. ``floor`` in a row is floor time / measured step time: 1.0 would be bandwidth-bound perfection.
"""

from __future__ import annotations

import datetime
import gc
import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..engine.generate import Engine, Request, Stats
from ..engine.load import GB, DoesNotFit, ModelSource, check_fits, kv_cache_bytes, require_memory
from ..engine.runner import drop_caches
from ..engine.sampling import SamplingParams
from ..formats import WeightFormat, resolve_device
from ..fused import linear_of
from ..models.loader import quantize_head
from ..models.parallel import TensorParallel
from ..nn import FPxLinear
from ..quantize import quantize_weight
from .timing import copy_bandwidth, device_name

WARMUP_STEPS = 3


def measured_as(weight_format: WeightFormat, device: torch.device) -> WeightFormat:
    """The format a measurement on ``device`` runs: half-precision float weights as float32 on a CPU (its
    half-precision matmuls are slow and not what a GPU computes); any other format as it is."""
    if device.type == "cpu" and weight_format.quantized is None:
        return WeightFormat.float_weights(torch.float32)
    return weight_format


def load_as(source: ModelSource, fmt, group_size: Optional[int] = None, device=None, progress: bool = True,
            tp: Optional[TensorParallel] = None, dtype: Optional[torch.dtype] = None) -> tuple:
    """(model in ``fmt``, note): ``source.load_model``, or for a packed checkpoint of another format, a model
    derived from its de-quantized weights (the only weights it holds): fp16 / bf16 / fp32 keep them as plain
    weights, an eXmY format re-quantizes them. The note says so ("from e3m2"); "" when nothing was derived.
    fmt: a WeightFormat, or its name with group_size and dtype (of the activations and unquantized tensors,
    default float16 on CUDA, float32 elsewhere) for WeightFormat.parse.

    Raises ValueError for a derived format under tensor parallelism (the re-quantization needs whole weights).
    """
    device = resolve_device(device)
    weight_format = WeightFormat.parse(fmt, dtype, device, group_size)
    meta = source.packed_meta()
    if meta is None or (weight_format.body_name == meta["format"]
                        and weight_format.group_size in (None, meta.get("group_size"))):
        return source.load_model(weight_format, device, progress=progress, tp=tp), ""
    if tp is not None and tp.world_size > 1:
        raise ValueError(f"{source.path} is packed as {meta['format']}: {weight_format} would be derived from its "
                         f"weights, which needs --tp 1")
    quantized, dtype, group_size = weight_format.quantized, weight_format.dtype, weight_format.group_size
    model = source.load_model(source.weight_format(dtype=dtype, device=device), device, progress=progress)
    layers = [(name, module) for name, module in model.named_modules()
              if isinstance(module, FPxLinear) and name != "lm_head"]  # a stored quantized head: below
    for name, layer in tqdm(layers, desc=f"derive {weight_format}", unit="layer", disable=not progress):
        weight = layer.weight.dequantize(torch.float32)
        if quantized is None:
            # the tensors themselves, in a Linear never initialised (no wasted fill, no draw from torch's generator)
            derived = linear_of(weight.to(dtype), None if layer.bias is None else layer.bias.detach().to(dtype))
        else:
            derived = FPxLinear(quantize_weight(weight, quantized, group_size), layer.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, derived)
    stored = model.lm_head.fmt if isinstance(model.lm_head, FPxLinear) else None
    if weight_format.head is not None and weight_format.head != stored:
        if stored is not None:  # the stored head's weights, re-quantized
            weight = model.lm_head.weight.dequantize(torch.float32)
            model.lm_head = linear_of(weight.to(dtype), None)
        quantize_head(model, weight_format.head)
    return model, f"from {meta['format']}"


@dataclass
class BenchRow:
    format: str
    batch: int
    prefill_tokens_per_s: Optional[float] = None
    decode_tokens_per_s: Optional[float] = None
    ms_per_step: Optional[float] = None
    weight_gb: Optional[float] = None
    peak_gb: Optional[float] = None
    floor_fraction: Optional[float] = None
    note: str = ""


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _unique_bytes(tensors) -> int:
    """Bytes of the tensors, each counted once (a tied weight appears twice among a model's parameters)."""
    unique = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer. Call before setup_caches (the KV cache is not weights)."""
    return _unique_bytes([*model.parameters(), *model.buffers()])


def streamed_weight_bytes(model: nn.Module) -> int:
    """Bytes a decode step reads in full: model_bytes less the embedding tables (a step reads one row per token),
    unless lm_head shares one (then lm_head reads it all). Call before setup_caches."""
    lm_head = getattr(model, "lm_head", None)
    head_weight = None if lm_head is None else lm_head.weight
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding) and m.weight is not head_weight}
    return _unique_bytes(t for t in [*model.parameters(), *model.buffers()] if id(t) not in lookups)


def bench_batch(model: nn.Module, batch: int, prompt_len: int, gen_len: int, cuda_graph: bool,
                bandwidth: float, streamed_bytes: int, seed: int = 0, compile: bool = False) -> dict:
    """Prefill + decode of ``batch`` random prompts of prompt_len tokens, gen_len new tokens each (no EOS stop).

    Returns the measurements of one BenchRow (without format, batch, weight_gb).
    """
    config = model.config
    engine = Engine(model, None, batch, prompt_len + gen_len, cuda_graph, compile)
    device = engine.device
    generator = torch.Generator().manual_seed(seed)

    def run(new_tokens: int) -> Engine:
        # fresh prompts each run: the warm-up's would be found in the prefix cache and not prefilled again
        prompts = torch.randint(3, config.vocab_size, (batch, prompt_len), generator=generator).tolist()
        engine.stats = Stats()
        engine.add([Request(ids, new_tokens, SamplingParams()) for ids in prompts])
        while engine.active:
            engine.step()
        return engine

    try:
        run(min(WARMUP_STEPS + 1, gen_len))  # compiles kernels, captures the decode graph; fits the cache
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        stats = run(gen_len).stats
        peak = torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None
    finally:
        engine.close()
        free_memory(device)  # back to the device, so that the next batch's memory check sees it free
    # Decode step j = 1 .. gen_len - 1 of a row reads the K/V of positions 0 .. prompt_len + j - 1.
    mean_context = prompt_len + gen_len / 2
    kv_read = kv_cache_bytes(config, batch, 1, engine.dtype) * mean_context
    floor_s = (streamed_bytes + kv_read) / bandwidth
    return dict(prefill_tokens_per_s=stats.prefill_tokens_per_s, decode_tokens_per_s=stats.decode_tokens_per_s,
                ms_per_step=stats.ms_per_step, peak_gb=peak, floor_fraction=floor_s * 1e3 / stats.ms_per_step)


def run_bench(source: ModelSource, formats: list, batches: list, prompt_len: int, gen_len: int, device=None,
              group_size: Optional[int] = None, cuda_graph: bool = True, progress: bool = True,
              compile: bool = False, tp: Optional[TensorParallel] = None) -> dict:
    """Every format x batch size, one model at a time. Returns {"setup": {...}, "rows": [BenchRow dicts]}.

    formats: WeightFormats or their names (WeightFormat.parse_list: group_size is the quantized ones').

    tp: run as that tensor-parallel rank (every rank calls run_bench alike); its rows are per GPU: weights, peak
    memory and the floor count the rank's bytes (its slices, the replicated rest, its KV heads).

    A format whose weights (or a batch whose KV cache) would not fit the free GPU memory, or that runs out of it,
    gets a row that says "does not fit" and the run goes on.
    """
    config = source.config()
    device = resolve_device(device)
    bandwidth = copy_bandwidth(device, 2**30 if device.type == "cuda" else 2**26)
    rows = []
    for requested in WeightFormat.parse_list(formats, group_size, device):
        weight_format = measured_as(requested, device)
        cast = "" if weight_format == requested else f"as {weight_format}"
        label = row_label(requested.name, cast)
        model = None
        try:
            check_fits(config, weight_format, device, 1, prompt_len + gen_len, tp)
            model, derived = load_as(source, weight_format, device=device, progress=progress, tp=tp)
            label = row_label(requested.name, cast, derived)
            weights, streamed = model_bytes(model), streamed_weight_bytes(model)
            dtype = weight_format.dtype
            for batch in tqdm(batches, desc=f"bench {label}", unit="batch", disable=not progress):
                row = BenchRow(label, batch, weight_gb=weights / GB)
                try:
                    cache = kv_cache_bytes(model.config, batch, prompt_len + gen_len, dtype)  # the rank's heads
                    require_memory(device, {"KV cache": cache}, f"batch {batch}")
                    for key, value in bench_batch(model, batch, prompt_len, gen_len, cuda_graph, bandwidth,
                                                  streamed, compile=compile).items():
                        setattr(row, key, value)
                except (DoesNotFit, torch.cuda.OutOfMemoryError) as err:
                    row.note = does_not_fit(err)
                if row.note:  # here, not in the except block: its traceback would keep the tensors alive
                    drop_caches(model)
                    free_memory(device)
                rows.append(row)
                if progress:  # each row as it is measured: a run cut short still shows its finished rows
                    tqdm.write(row_line(row))
        except (DoesNotFit, torch.cuda.OutOfMemoryError) as err:
            rows.append(BenchRow(label, 0, note=does_not_fit(err)))
        finally:
            del model
            free_memory(device)
    setup = {"date": datetime.date.today().isoformat(), "device": device_name(device), "model": source.name,
             "prompt_len": prompt_len, "gen_len": gen_len, "group_size": group_size, "cuda_graph": cuda_graph
             and device.type == "cuda", "compile": compile, "copy_bandwidth_gb_s": bandwidth / GB,
             "torch": torch.__version__,
             "cuda": torch.version.cuda, "machine": platform.machine(), "tensor_parallel": tp.world_size if tp else 1}
    return {"setup": setup, "rows": [asdict(row) for row in rows]}


def row_label(name: str, *notes: str) -> str:
    """A row's format: "fp16", or with its notes "fp16 (as fp32, from e3m2)"."""
    notes = [note for note in notes if note]
    return f"{name} ({', '.join(notes)})" if notes else name


def row_line(row: BenchRow) -> str:
    """One measured row in words, for the log while the bench runs."""
    if row.note:
        return f"{row.format} batch {row.batch}: {row.note}"
    return (f"{row.format} batch {row.batch}: prefill {row.prefill_tokens_per_s:.0f} tok/s, decode "
            f"{row.decode_tokens_per_s:.1f} tok/s ({row.ms_per_step:.2f} ms/step, {row.floor_fraction:.2f} of the "
            f"floor)")


def does_not_fit(err: Exception) -> str:
    """The note of a row that ran out of memory: our estimate's numbers, or what CUDA said."""
    return "does not fit: " + str(err).splitlines()[0]


def _cell(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _gb(value) -> str:
    """GB with two decimals, or three significant digits below 1 GB (a small model is not 0.00 GB)."""
    return "-" if value is None else f"{value:.2f}" if value >= 1 else f"{value:.3g}"


def format_table(result: dict) -> str:
    """The rows as a Markdown table, the setup above it."""
    s = result["setup"]
    lines = [f"# End-to-end benchmark: {s['model']} on {s['device']}, {s['date']}", "",
             f"prompt {s['prompt_len']} tokens, {s['gen_len']} new tokens per row (greedy, no EOS stop); decode "
             f"steps {'as CUDA graphs' if s['cuda_graph'] else 'eager'}"
             f"{' of torch.compile-d forwards' if s.get('compile') else ''}"
             f"{'; kernels by programmatic dependent launch (Hopper)' if s.get('programmatic_launch') else ''}"
             f"; copy bandwidth "
             f"{s['copy_bandwidth_gb_s']:.1f} GB/s (read + write); floor = (weights + KV read per step) / copy "
             f"bandwidth / measured step time; torch {s['torch']}", "",
             *([f"tensor parallel over {s['tensor_parallel']} ranks, one GPU each: weight GB, peak GB and floor are "
                f"per GPU", ""] if s.get("tensor_parallel", 1) > 1 else []),
             "| format | batch | prefill tok/s | decode tok/s | ms/step | weight GB | peak GB | floor |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if r["note"]:
            lines.append(f"| {r['format']} | {r['batch'] or '-'} | {r['note']} | | | {_gb(r['weight_gb'])} | | |")
            continue
        lines.append(f"| {r['format']} | {r['batch']} | {r['prefill_tokens_per_s']:.0f} | "
                     f"{r['decode_tokens_per_s']:.1f} | {r['ms_per_step']:.2f} | {_gb(r['weight_gb'])} | "
                     f"{_gb(r['peak_gb'])} | {r['floor_fraction']:.3g} |")
    return "\n".join(lines)


def write_results(result: dict, out_dir, kind: str = "e2e", table=format_table) -> tuple:
    """A benchmark's result as <kind>-<device>-<date>.md (``table(result)``) and .json in out_dir, or
    <kind>-<device>-<date>-2.md/.json (3, ...) when that day's files exist: an earlier run is never overwritten.
    result["setup"] names the device and date. Returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "-".join("".join(c if c.isalnum() else " " for c in result["setup"]["device"].lower()).split())
    name, run = f"{kind}-{device}-{result['setup']['date']}", 1
    while True:
        stem = out_dir / (name if run == 1 else f"{name}-{run}")
        md, js = Path(f"{stem}.md"), Path(f"{stem}.json")
        if not md.exists() and not js.exists():
            break
        run += 1
    md.write_text(table(result) + "\n")
    js.write_text(json.dumps(result, indent=1) + "\n")
    return md, js
