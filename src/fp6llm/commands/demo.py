"""`fp6llm demo`: the main job on an embedded default, no downloads."""

from __future__ import annotations

import argparse
import time

import torch

from ..cli import command


@command("demo", "quantize a random layer to every format and run fpx_linear (no downloads)")
def _demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=1024, help="N = K of the random weight (default 1024)")
    parser.add_argument("--formats", default="e3m2,e2m3,e2m2,e3m1,e2m1", help="comma-separated format names")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.set_defaults(run=_demo)


def _demo(args) -> None:
    from ..formats import FPFormat
    from ..ops import fpx_linear
    from ..quantize import quantize_weight

    formats = [FPFormat.parse(name) for name in args.formats.split(",")]
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(args.size, args.size, generator=gen) * 0.02).to(args.device)
    x = torch.randn(4, args.size, generator=gen).to(args.device, torch.float16 if args.device != "cpu" else
                                                    torch.float32)
    ref = x.double() @ w.double().T
    print(f"{'format':8} {'bits':>4} {'MiB':>8} {'vs fp16':>8} {'weight rel err':>15} {'output rel err':>15} {'ms':>8}")
    fp16_bytes = w.numel() * 2
    for fmt in formats:
        qw = quantize_weight(w, fmt)
        werr = ((qw.dequantize() - w).norm() / w.norm()).item()
        start = time.perf_counter()
        y = fpx_linear(x, qw)
        if y.is_cuda:
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3
        yerr = ((y.double() - ref).norm() / ref.norm()).item()
        print(f"{fmt.name:8} {fmt.bits:4d} {qw.nbytes / 2**20:8.2f} {qw.nbytes / fp16_bytes:8.3f} {werr:15.5f} "
              f"{yerr:15.5f} {ms:8.2f}")
