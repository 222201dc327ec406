"""Where a prefill's time goes, on the host and on the GPU: the engine's eager prefill of ``batch`` random prompts
(a random model, each format): its wall time (median of the repetitions), the GPU's busy time in it (the sum of the
kernels' device times, torch.profiler; without programmatic dependent launch, so kernels do not overlap), and the
Python functions that take the host's time (cProfile, by own time).

    python bench/profile_prefill.py [--model llama-2-13b] [--formats fp16,e3m2] [--batch 1] [--prompt-len 128]
                                    [--reps 5] [--top 25] [--out FILE.json]

A prefill whose wall time is well above its GPU time is bound by the host: the launches and the Python around
them (dispatch, checks), not by the kernels.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel import write_record  # noqa: E402
from fp6llm.engine.generate import Engine, Request  # noqa: E402
from fp6llm.engine.sampling import SamplingParams  # noqa: E402
from fp6llm.evals.throughput import free_memory  # noqa: E402
from fp6llm.kernels import launch  # noqa: E402
from fp6llm.models.loader import build_random  # noqa: E402


def prefill_once(engine: Engine, batch: int, prompt_len: int, vocab: int, generator: torch.Generator) -> float:
    """Seconds of the engine's prefill of ``batch`` fresh prompts (one new token each, so no decode step)."""
    prompts = torch.randint(3, vocab, (batch, prompt_len), generator=generator).tolist()
    engine.stats.prefill_seconds = 0.0
    engine.add([Request(ids, 1, SamplingParams()) for ids in prompts])
    while engine.active:
        engine.step()
    return engine.stats.prefill_seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-2-13b")
    parser.add_argument("--formats", default="fp16,e3m2")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    results = {}
    for fmt in args.formats.split(","):
        model = build_random(args.model, fmt, device="cuda", progress=False)
        vocab = model.config.vocab_size
        engine = Engine(model, None, args.batch, args.prompt_len + 8, True)
        generator = torch.Generator().manual_seed(0)
        with launch.programmatic_launch(False):
            prefill_once(engine, args.batch, args.prompt_len, vocab, generator)  # compiles, loads the kernels
            walls = [prefill_once(engine, args.batch, args.prompt_len, vocab, generator) for _ in range(args.reps)]
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                prefill_once(engine, args.batch, args.prompt_len, vocab, generator)
                torch.cuda.synchronize()
            gpu_us = sum(event.device_time for event in prof.events()
                         if event.device_type == torch.autograd.DeviceType.CUDA)
            launches = sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)
            profiler = cProfile.Profile()
            profiler.enable()
            prefill_once(engine, args.batch, args.prompt_len, vocab, generator)
            profiler.disable()
        engine.close()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.top)
        wall_ms = statistics.median(walls) * 1e3
        results[fmt] = {"wall_ms": wall_ms, "walls_ms": [w * 1e3 for w in walls], "gpu_ms": gpu_us / 1e3,
                        "kernels": launches, "cprofile": text.getvalue()}
        print(f"{fmt}: batch {args.batch} x {args.prompt_len} tokens: prefill {wall_ms:.1f} ms wall "
              f"({args.batch * args.prompt_len / wall_ms * 1e3:.0f} tok/s), GPU busy {gpu_us / 1e3:.1f} ms in "
              f"{launches} kernels", flush=True)
        print("\n".join(text.getvalue().splitlines()[:args.top + 12]), flush=True)
        del model, engine
        free_memory(torch.device("cuda"))
    if args.out:
        write_record(args.out, args=vars(args), results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
