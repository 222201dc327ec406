"""Programmatic dependent launch A/B in one process: llama-2-13b (random weights) decode steps with the kernels
launched without PDL (off), with it (on), with it and the small-M kernel's first weight tile loaded before its wait
(early, the default), and as early but with the wgmma path's x permuted by a torch copy instead of x_order_kernel
(torch-x-order, as before 2026-12-04), interleaved at each batch size so that clocks and the order of runs weigh on
all alike; ms per decode step (CUDA graphs), the median of the repetitions (ratios against the first mode given).

    python bench/pdl_ab.py [--formats fp16,e3m2] [--batch 1,8,32,64] [--reps 3] [--out FILE.json]
                           [--modes off,on,early,torch-x-order]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel import write_record  # noqa: E402
from fp6llm.evals.throughput import bench_batch, free_memory  # noqa: E402
from fp6llm.kernels import fpx_cuda, launch, x_order  # noqa: E402
from fp6llm.models.loader import build_random  # noqa: E402

# pdl: programmatic dependent launch; early: the small-M kernel's first weight tile before its wait; torch_x_order:
# the wgmma path's x permuted by a torch copy instead of x_order_kernel
MODES = {"off": dict(pdl=False), "on": dict(pdl=True), "early": dict(pdl=True, early=True),
         "torch-x-order": dict(pdl=True, early=True, torch_x_order=True)}


def set_mode(pdl=False, early=False, torch_x_order=False):
    fpx_cuda.EARLY_WEIGHTS = early
    fpx_cuda.wgmma_x_order = x_order.wgmma_x_order_reference if torch_x_order else x_order.wgmma_x_order
    return launch.programmatic_launch(pdl)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-2-13b")
    parser.add_argument("--formats", default="fp16,e3m2")
    parser.add_argument("--batch", default="1,8,32,64")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES), help="a subset of " + ",".join(MODES))
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if unknown := [mode for mode in modes if mode not in MODES]:
        parser.error(f"unknown mode(s) {', '.join(unknown)}: choose from {', '.join(MODES)}")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    rows = []
    for fmt in args.formats.split(","):
        model = build_random(args.model, fmt, device="cuda", progress=False)
        for batch in map(int, args.batch.split(",")):
            times = {mode: [] for mode in modes}
            for _ in range(args.reps):
                for mode in modes:
                    with set_mode(**MODES[mode]):
                        times[mode].append(bench_batch(model, batch, args.prompt_len, args.gen_len, True, 1.0, 1)
                                           ["ms_per_step"])
            set_mode(**MODES["early"])  # the defaults
            median = {mode: statistics.median(t) for mode, t in times.items()}
            rows.append({"format": fmt, "batch": batch, **{f"{mode}_ms": t for mode, t in times.items()}})
            print(f"{fmt:5} batch {batch:3}: " + "  ".join(
                f"{mode} {median[mode]:6.2f} ms ({median[modes[0]] / median[mode]:.3f}x)" for mode in modes)
                + "  all: " + " ".join(f"{mode} {['%.2f' % t for t in times[mode]]}" for mode in modes), flush=True)
        del model
        free_memory(torch.device("cuda"))
    if args.out:
        write_record(args.out, args=vars(args), rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
