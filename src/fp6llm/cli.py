"""The ``fp6llm`` command: thin subcommands that parse arguments and call the library.

Every subcommand registers itself in ``COMMANDS`` through ``command``; errors a user can cause (ValueError,
TypeError, FileNotFoundError, ...) become one line on stderr and exit status 2, with no traceback.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

COMMANDS = {}


def command(name: str, help: str):
    """Register ``add_arguments(parser)`` for subcommand ``name``; the parser's ``run`` default does the work."""
    def register(add_arguments):
        COMMANDS[name] = (help, add_arguments)
        return add_arguments
    return register


@command("demo", "quantize a random layer to every format and run fpx_linear (no downloads)")
def _demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=1024, help="N = K of the random weight (default 1024)")
    parser.add_argument("--formats", default="e3m2,e2m3,e2m2,e3m1,e2m1", help="comma-separated format names")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.set_defaults(run=_demo)


def _demo(args) -> None:
    from .formats import FPFormat
    from .ops import fpx_linear
    from .quantize import quantize_weight

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


USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, KeyError, MemoryError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fp6llm", description="FP6 / FPx weight-only LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help, add_arguments) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help, description=help))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except USER_ERRORS as err:
        print(f"fp6llm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fp6llm {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
