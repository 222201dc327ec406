"""`fp6llm quantize`: a Hugging Face safetensors model directory -> an fp6llm packed checkpoint."""

from __future__ import annotations

import argparse

from ..cli import command


@command("quantize", "quantize a Hugging Face safetensors model into a packed fp6llm checkpoint (streaming)")
def _quantize_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src_dir", help="model directory with config.json and *.safetensors")
    parser.add_argument("out_dir", help="output directory (created if needed)")
    parser.add_argument("--format", default="e3m2", help="FPx format (e3m2 = fp6, e2m2, e2m1, ...) or fp16/bf16")
    parser.add_argument("--group-size", type=int, default=None, help="one scale per this many input columns "
                        "(default: one per output channel)")
    parser.add_argument("--device", default="cpu", help="where to quantize (cuda is much faster; default cpu)")
    parser.add_argument("--max-shard-gb", type=float, default=2.0, help="largest output shard in GB (default 2)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=_quantize)


def _quantize(args) -> None:
    from ..models.checkpoint import quantize_checkpoint

    summary = quantize_checkpoint(args.src_dir, args.out_dir, args.format, args.group_size, args.device,
                                  int(args.max_shard_gb * 1e9), progress=not args.quiet)
    grouping = "per-channel" if summary["group_size"] is None else f"group_size={summary['group_size']}"
    print(f"{args.out_dir}: {summary['format']} {grouping}, {summary['tensors']} tensors in {summary['shards']} "
          f"shard(s), {_size(summary['bytes_in'])} in -> {_size(summary['bytes_out'])} out "
          f"({summary['bytes_out'] / max(summary['bytes_in'], 1):.3f}x), {summary['seconds']:.1f} s")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"
