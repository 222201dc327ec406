"""`fp6llm demo`: the main job on the embedded default model, no downloads.

Two parts: every format on one random layer (bytes, weight error, output error of fpx_linear, time per call after
a warm-up call), then text from the embedded FP6 model (a small Llama trained on the stdlib's source), streamed as
it is generated.
"""

from __future__ import annotations

import argparse
import statistics
import time

from ..cli import at_least, check_device, command

FORMATS_DEFAULT = "e3m2,e2m3,e2m2,e3m1,e2m1"
TIMED_CALLS = 3  # the ms column is the median of these, after one untimed warm-up call (Triton compiles there)


@command("demo", "every format on a random layer, then text from the embedded FP6 model (no downloads)")
def _demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=1024, help="N = K of the random weight (default 1024)")
    parser.add_argument("--prompt", default="def parse_args(argv):\n", help="prompt for the embedded model (default "
                                                                          "'def parse_args(argv):\\n')")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    parser.add_argument("--formats", default=FORMATS_DEFAULT, help=f"comma-separated format names (default "
                                                                   f"{FORMATS_DEFAULT})")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.set_defaults(run=_demo)


def _demo(args) -> None:
    at_least("--size", args.size, 1)
    at_least("--max-new-tokens", args.max_new_tokens, 1)
    check_device(args.device)
    from ..formats import FPFormat
    formats = [FPFormat.parse(name.strip()) for name in args.formats.split(",") if name.strip()]
    if not formats:
        raise ValueError(f"--formats: no format in {args.formats!r}")

    import torch

    from ..engine import ModelSource, load
    from ..engine.generate import check_length, synchronize
    from ..ops import fpx_linear
    from ..quantize import quantize_weight

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    source = ModelSource.parse(None)  # the embedded model; the prompt is checked before any work
    config = source.config()
    tokenizer = source.tokenizer(config)
    check_length(len(tokenizer.encode(args.prompt)), args.max_new_tokens,
                 config.max_position_embeddings, config.max_position_embeddings, "the prompt")
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(args.size, args.size, generator=gen) * 0.02).to(device)
    x = torch.randn(4, args.size, generator=gen).to(device, torch.float16 if device.type == "cuda" else
                                                    torch.float32)
    ref = x.double() @ w.double().T
    print(f"{'format':8} {'bits':>4} {'MiB':>8} {'vs fp16':>8} {'weight rel err':>15} {'output rel err':>15} {'ms':>8}")
    fp16_bytes = w.numel() * 2
    for fmt in formats:
        qw = quantize_weight(w, fmt)
        werr = ((qw.dequantize() - w).norm() / w.norm()).item()
        y = fpx_linear(x, qw)  # warm-up: compiles the kernel on a GPU, not timed
        times = []
        for _ in range(TIMED_CALLS):
            synchronize(device)
            start = time.perf_counter()
            y = fpx_linear(x, qw)
            synchronize(device)
            times.append(time.perf_counter() - start)
        yerr = ((y.double() - ref).norm() / ref.norm()).item()
        print(f"{fmt.name:8} {fmt.bits:4d} {qw.nbytes / 2**20:8.2f} {qw.nbytes / fp16_bytes:8.3f} {werr:15.5f} "
              f"{yerr:15.5f} {statistics.median(times) * 1e3:8.2f}")
    print(f"ms: median of {TIMED_CALLS} calls of fpx_linear on x [4, {args.size}] after a warm-up call")

    engine = load(source, device=device, progress=False, tokenizer=tokenizer)
    # Warm-up, untimed: decodes the weights once on a CPU (fp6llm.nn); compiles and captures the decode graph on a GPU.
    engine.generate(args.prompt, max_new_tokens=4)
    print(f"\nembedded model (FP6 e3m2, {device}), greedy, prompt {args.prompt!r}:\n")
    print(args.prompt, end="", flush=True)
    engine.generate(args.prompt, max_new_tokens=args.max_new_tokens,
                    stream=lambda delta: print(delta.text, end="", flush=True))
    print(f"\n\n{engine.stats.summary()}")
