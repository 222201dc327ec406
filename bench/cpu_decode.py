"""CPU decode speed of the embedded model, and the wall time of `fp6llm demo`, for each torch thread count.

    python3 bench/cpu_decode.py                    # threads 1 and all cores, 64 new tokens, 3 runs each
    python3 bench/cpu_decode.py --threads 1,2 --out bench/results/cpu-decode.md

Decode tok/s is the engine's own figure (Stats: the median step of greedy decoding, after one warm-up generation
that decodes every FPx weight once; see fp6llm.nn). The demo runs as a user runs it (a fresh `python -m fp6llm
demo` with OMP_NUM_THREADS set), so its time includes importing torch and loading the model. The load average is
printed beside each figure: on a shared machine it says how much of the CPU the run had.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time


def decode_tokens_per_s(threads: int, new_tokens: int, runs: int) -> list:
    """Decode tok/s of each run of greedy generation from the embedded model with ``threads`` torch threads."""
    import torch

    import fp6llm

    torch.set_num_threads(threads)
    engine = fp6llm.load(device="cpu", progress=False)
    engine.generate("def parse_args(argv):\n", max_new_tokens=4)  # warm-up: decodes the weights once
    speeds = []
    for _ in range(runs):
        engine.generate("def parse_args(argv):\n", max_new_tokens=new_tokens)
        speeds.append(engine.stats.decode_tokens_per_s)
    return speeds


def demo_seconds(threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fp6llm", "demo", "--device", "cpu"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}", help="comma-separated torch thread counts "
                                                                         "(default 1 and all cores)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per generation (default 64)")
    parser.add_argument("--runs", type=int, default=3, help="generations per thread count (default 3)")
    parser.add_argument("--out", default=None, help="also write the table to this Markdown file")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]

    import torch

    lines = [f"# CPU decode of the embedded model (stdlib-lm-e3m2, FP6 e3m2), {datetime.date.today().isoformat()}", "",
             f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; {args.new_tokens} new tokens "
             f"per generation, greedy; decode tok/s: median step of each run (min / median / max of {args.runs} "
             f"runs); demo: wall time of `python -m fp6llm demo --device cpu`; load: 1-minute load average before "
             f"each measurement", "",
             "| torch threads | decode tok/s (min / median / max) | load | demo s | load |",
             "|---:|---:|---:|---:|---:|"]
    for count in threads:
        load = os.getloadavg()[0]
        speeds = decode_tokens_per_s(count, args.new_tokens, args.runs)
        demo_load = os.getloadavg()[0]
        demo = demo_seconds(count)
        lines.append(f"| {count} | {min(speeds):.1f} / {statistics.median(speeds):.1f} / {max(speeds):.1f} | "
                     f"{load:.1f} | {demo:.1f} | {demo_load:.1f} |")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as out:
            out.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
