"""Where a decode step's time goes: the GPU time of each kernel of one decode step (torch.profiler over a few
steps, eager and in the engine's CUDA graph), grouped (the FPx GEMMs, cuBLAS, attention, norms, rotary, the MLP's
activation, sampling, the rest), against the step's wall time; for each format of a random model.

    python bench/profile_decode.py [--model llama-2-13b] [--formats fp16,e3m2] [--batch 1] [--prompt-len 128]
                                   [--steps 8] [--pdl off|on|both] [--graph-only] [--out FILE.json]

A kernel's time is its own (the profiler's device time); the step's wall time minus the kernels' sum is what the
GPU spent idle between kernels (launch gaps, host work). With programmatic dependent launch (the default on Hopper,
kernels/launch.py) a kernel's time includes the time its CTAs waited for the previous kernel, so kernels overlap,
their sum can pass the wall time and "idle" can be negative: compare wall times there (--pdl both).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
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

GROUPS = (("fpx", ("fpx_", "_fpx")), ("cublas", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "sm90_", "splitk")),
          ("attention", ("attention", "attn", "flash", "sdpa", "softmax")),
          ("norm", ("norm",)), ("rotary", ("rotary", "rope")), ("activation", ("silu", "gelu", "relu", "act")),
          ("sampling", ("sampl", "argmax", "topk", "sort", "multinomial", "cumsum")),
          ("copy/index", ("copy", "index", "scatter", "gather", "fill", "cat")))


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(key in low for key in keys):
            return group
    return "other"


def profile(engine: Engine, steps: int) -> dict:
    """Kernel times per decode step (us) over ``steps`` steps of the running requests, and the step's wall time."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    kernels = collections.defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name][0] += event.device_time / steps
            kernels[event.name][1] += 1 / steps
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - started) / steps * 1e6
    return {"wall_us": wall, "kernels": {name: {"us": us, "per_step": n} for name, (us, n) in kernels.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-2-13b")
    parser.add_argument("--formats", default="fp16,e3m2")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--pdl", default="on", choices=["off", "on", "both"],
                        help="programmatic dependent launch of the kernels that take it (kernels/launch.py; default on, "
                             "as the engine runs)")
    parser.add_argument("--graph-only", action="store_true", help="profile the CUDA graph's step only, not eager")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    results = {}
    for fmt in args.formats.split(","):
        model = build_random(args.model, fmt, device="cuda", progress=False)
        for graph, pdl in [(g, p) for g in ((True,) if args.graph_only else (True, False))
                           for p in {"off": (False,), "on": (True,), "both": (False, True)}[args.pdl]]:
            with launch.programmatic_launch(pdl):
                engine = Engine(model, None, args.batch, args.prompt_len + 4 * args.steps + 8, cuda_graph=graph)
                prompts = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt_len)).tolist()
                engine.add([Request(ids, 4 * args.steps + 4, SamplingParams()) for ids in prompts])
                for _ in range(3):  # the prefill, then decode steps that capture the graph
                    engine.step()
                run = profile(engine, args.steps)
                engine.close()
                groups = collections.defaultdict(lambda: [0.0, 0.0])
                for name, k in run["kernels"].items():
                    groups[group_of(name)][0] += k["us"]
                    groups[group_of(name)][1] += k["per_step"]
                busy = sum(us for us, _ in groups.values())
                label = f"{fmt} batch {args.batch} {'graph' if graph else 'eager'}{' pdl' if pdl else ''}"
                results[label] = dict(run, groups={g: {"us": us, "launches": n} for g, (us, n) in groups.items()})
                print(f"{label}: step {run['wall_us']:.0f} us, kernels {busy:.0f} us "
                      f"({sum(n for _, n in groups.values()):.0f} launches), idle {run['wall_us'] - busy:.0f} us"
                      f"{' (kernel times include their waits)' if pdl else ''}")
                for g, (us, n) in sorted(groups.items(), key=lambda item: -item[1][0]):
                    print(f"  {g:11} {us:8.0f} us  {n:6.0f} launches  {us / max(n, 1):6.1f} us each")
                top = sorted(run["kernels"].items(), key=lambda item: -item[1]["us"])[:12]
                for name, k in top:
                    print(f"    {k['us']:8.0f} us {k['per_step']:5.0f}x  {name[:110]}")
        del model
        free_memory(torch.device("cuda"))
    if args.out:
        write_record(args.out, args=vars(args), results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
