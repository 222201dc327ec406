"""`fp6llm quantize`: a Hugging Face safetensors model directory -> an fp6llm packed checkpoint."""

from __future__ import annotations

import argparse
import shutil

from ..cli import at_least, check_device, check_output_dir, command

DTYPE_NAMES = ("fp16", "bf16", "fp32")


@command("quantize", "quantize a Hugging Face safetensors model into a packed fp6llm checkpoint (streaming)")
def _quantize_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src_dir", help="model directory with config.json and *.safetensors")
    parser.add_argument("out_dir", help="output directory (created if needed)")
    parser.add_argument("--format", default="e3m2", help="FPx format (e3m2 = fp6, e2m2, e2m1, ...) or fp16/bf16 "
                                                         "(default e3m2)")
    parser.add_argument("--group-size", type=int, default=None, help="one scale per this many input columns "
                        "(default: one per output channel)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                        help="dtype of the tensors that stay unquantized: embeddings, lm_head, norms (default fp16, "
                             "bf16 for a bfloat16 source)")
    parser.add_argument("--device", default="cpu", help="where to quantize (cuda is much faster; default cpu)")
    parser.add_argument("--max-shard-gb", type=float, default=2.0, help="largest output shard in GB (default 2)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=_quantize)


def _quantize(args) -> None:
    if not args.format.strip():
        raise ValueError("--format is empty: give a format such as e3m2")
    at_least("--group-size", args.group_size, 1)
    if not args.max_shard_gb > 0 or args.max_shard_gb * 1e9 < 1:
        raise ValueError(f"--max-shard-gb must be > 0, got {args.max_shard_gb}")
    check_device(args.device)
    out_dir = check_output_dir(args.out_dir, "output directory")
    from ..engine.load import ModelSource
    from ..formats import UNQUANTIZED, WeightFormat
    from ..models.checkpoint import quantize_checkpoint
    from ..models.loader import read_hf_config

    weight_format = WeightFormat.parse(args.format, None, args.device, args.group_size)
    source = ModelSource.parse(args.src_dir)
    if source.path.resolve() == out_dir.resolve():
        raise ValueError(f"the output directory must differ from the source ({source.path})")
    meta = source.packed_meta()
    if meta is None:
        read_hf_config(source.path)  # config.json, before anything is written
    dtype = None if args.dtype is None else UNQUANTIZED[args.dtype]
    created = not out_dir.exists()
    try:
        if meta is None:
            summary = quantize_checkpoint(source.path, out_dir, weight_format, device=args.device,
                                          max_shard_bytes=int(args.max_shard_gb * 1e9), progress=not args.quiet,
                                          dtype=dtype)
        else:
            summary = _repack(source, weight_format, out_dir, args, dtype)
    except BaseException:  # a failed or interrupted run leaves no half-written directory of its own making
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    grouping = "per-channel" if summary["group_size"] is None else f"group_size={summary['group_size']}"
    print(f"{args.out_dir}: {summary['format']} {grouping}, {summary['tensors']} tensors in {summary['shards']} "
          f"shard(s), {_size(summary['bytes_in'])} in -> {_size(summary['bytes_out'])} out "
          f"({summary['bytes_out'] / max(summary['bytes_in'], 1):.3f}x), {summary['seconds']:.1f} s")


def _repack(source, weight_format, out_dir, args, dtype) -> dict:
    """A packed checkpoint (the embedded model, say) in another format (a WeightFormat): its de-quantized weights,
    re-quantized (evals.throughput.load_as); what stays unquantized is stored in dtype (default float16)."""
    import time
    from dataclasses import replace

    import torch

    from ..evals.throughput import load_as
    from ..models.checkpoint import save_packed
    from ..models.loader import SafetensorsCheckpoint

    start = time.perf_counter()
    if weight_format.quantized is not None:
        weight_format = replace(weight_format, dtype=dtype or torch.float16)
    model, _ = load_as(source, weight_format, device=args.device, progress=not args.quiet)
    summary = save_packed(model, out_dir, source=source.path, max_shard_bytes=int(args.max_shard_gb * 1e9))
    checkpoint = SafetensorsCheckpoint(source.path)
    bytes_in = sum((source.path / name).stat().st_size for name in set(checkpoint.weight_map.values()))
    checkpoint.close()
    return {**summary, "bytes_in": bytes_in, "seconds": time.perf_counter() - start, "format": weight_format.name,
            "group_size": weight_format.group_size}


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"
