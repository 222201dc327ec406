"""Programmatic dependent launch A/B in one process: llama-2-13b (random weights) decode steps with the kernels
launched without PDL, with it, with it and the small-M kernel's first weight tile loaded before its wait (early),
with that and its trigger of the next grid right after its wait (trigger), and early with the wgmma path's x
permuted by a torch copy (torch-x-order, before 2026-12-04) instead of x_order_kernel, interleaved at each batch
size so that clocks and the order of runs weigh on all alike; ms per decode step (CUDA graphs), the median of the
repetitions (ratios against the first mode given).

    python bench/pdl_ab.py [--formats fp16,e3m2] [--batch 1,8,32,64] [--reps 3] [--out FILE.json]
                           [--modes off,on,early,trigger,torch-x-order]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from fp6llm.evals.throughput import bench_batch, free_memory  # noqa: E402
from fp6llm.kernels import fpx_cuda, launch, x_order  # noqa: E402

# (programmatic dependent launch, the small-M kernel's first weight tile before its wait, its trigger of the next
# grid right after that wait, the wgmma path's x permuted by a torch copy instead of x_order_kernel)
MODES = {"off": (False, False, False, False), "on": (True, False, False, False), "early": (True, True, False, False),
         "trigger": (True, True, True, False), "torch-x-order": (True, True, False, True)}
from fp6llm.models.loader import build_random  # noqa: E402


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
                    pdl, early, trigger, torch_x_order = MODES[mode]
                    fpx_cuda.EARLY_WEIGHTS, fpx_cuda.EARLY_TRIGGER = early, trigger
                    fpx_cuda.wgmma_x_order = x_order.wgmma_x_order_reference if torch_x_order else \
                        x_order.wgmma_x_order
                    with launch.programmatic_launch(pdl):
                        times[mode].append(bench_batch(model, batch, args.prompt_len, args.gen_len, True, 1.0, 1)
                                           ["ms_per_step"])
            fpx_cuda.EARLY_WEIGHTS, fpx_cuda.EARLY_TRIGGER = True, False
            fpx_cuda.wgmma_x_order = x_order.wgmma_x_order
            median = {mode: statistics.median(t) for mode, t in times.items()}
            rows.append({"format": fmt, "batch": batch, **{f"{mode}_ms": t for mode, t in times.items()}})
            print(f"{fmt:5} batch {batch:3}: " + "  ".join(
                f"{mode} {median[mode]:6.2f} ms ({median[modes[0]] / median[mode]:.3f}x)" for mode in modes)
                + "  all: " + " ".join(f"{mode} {['%.2f' % t for t in times[mode]]}" for mode in modes), flush=True)
        del model
        free_memory(torch.device("cuda"))
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(0),
                                              "date": time.strftime("%Y-%m-%d"), "args": vars(args), "rows": rows},
                                             indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
