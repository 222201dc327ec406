"""`fp6llm demo`: the main job on the embedded default model, no downloads.

Two parts: every format on one random layer (bytes, weight error, output error of fpx_linear), then text from
the embedded FP6 model (a small Llama trained on the stdlib's source), streamed as it is generated.
"""

from __future__ import annotations

import argparse
import time

import torch

from ..cli import command


@command("demo", "every format on a random layer, then text from the embedded FP6 model (no downloads)")
def _demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=1024, help="N = K of the random weight (default 1024)")
    parser.add_argument("--prompt", default="def parse_args(argv):\n", help="prompt for the embedded model")
    parser.add_argument("--max-new-tokens", type=int, default=64)
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

    from ..engine import load
    engine = load(None, device=args.device, progress=False)
    print(f"\nembedded model (FP6 e3m2, {args.device}), greedy, prompt {args.prompt!r}:\n")
    print(args.prompt, end="", flush=True)
    engine.generate(args.prompt, max_new_tokens=args.max_new_tokens,
                    stream=lambda delta: print(delta.text, end="", flush=True))
    print(f"\n\n{engine.stats.summary()}")
