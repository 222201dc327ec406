"""The small-M kernel's fixed costs at M = 1..16 (5-8 us above the byte floor on every H200 shape, 2026-12-02), two
remedies timed against the plain kernel in one run (CUDA graphs over rotating operand copies:
fp6llm/evals/timing.py, so each call follows another call of the same kernel, as a decode step's layers do):

- split-K summed in a thread block cluster (fpx_small_m.cu, CLUSTER_SPLIT: the row block's CTAs add each other's
  partials from shared memory) instead of the workspace (partials to global memory, a fence, an arrival counter,
  the last CTA sums), at each shape's split from the GPU's table where it is 2..8;
- programmatic dependent launch (PDL: a call's CTAs start while the previous call drains, and wait for it before
  they touch memory; pdl+early: they load their first weight tile before that wait, launch.static_weights);
- plainx: x read when its tile is computed (prefetch_x off); rt2: that, with two 16-row tiles per warp sharing
  each load of x (row_tiles=2);
- w2 / w3 / w4 (and w3x ...: x at compute time; w3r2 ...: two row tiles per warp): 2, 3 or 4 weight tiles in
  registers per warp, 1-3 in flight while one is computed (w_ahead), launched with PDL and the first weight tiles
  before the wait, as a decode step does.

    python bench/small_m_tail_ab.py [--ms 1,8,16] [--shapes all|13b-o,...] [--splits table|2,4,8]
                                    [--variants plain,cluster,...] [--out FILE.json]

Against cuBLAS FP16 and the bandwidth floor (the faster of the copy and read bandwidths measured in the run). Needs
an sm_90 GPU. Each variant is checked against the plain kernel (bit-identical sums) before it is timed.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel import SHAPES, dense_calls, random_weight, rotating_calls, shape_names, write_record  # noqa: E402

from fp6llm.evals.timing import copy_bandwidth, read_bandwidth, time_calls  # noqa: E402
from fp6llm.formats import FPFormat  # noqa: E402
from fp6llm.kernels import fpx_cuda, launch  # noqa: E402
from fp6llm.kernels.dispatch import measured_small_m  # noqa: E402

VARIANTS = {"plain": dict(cluster_split=False, pdl=False), "cluster": dict(cluster_split=True, pdl=False),
            "pdl": dict(cluster_split=False, pdl=True), "cluster+pdl": dict(cluster_split=True, pdl=True),
            "pdl+early": dict(cluster_split=False, pdl=True, static=True),
            "plainx": dict(cluster_split=False, pdl=False, prefetch_x=False),
            "rt2": dict(cluster_split=False, pdl=False, prefetch_x=False, row_tiles=2)}
# w_ahead: 2 (the measured ping-pong), 3 or 4 weight tiles in registers per warp (built 2026-12-05), x a tile ahead or
# (x) at compute time; launched as a decode step launches them (PDL, the first weight tile before the wait)
VARIANTS.update({f"w{w}{'x' if not px else ''}": dict(cluster_split=False, pdl=True, static=True, prefetch_x=px,
                                                       row_tiles=1, w_ahead=w)
                 for w in (2, 3, 4) for px in (True, False)})
VARIANTS.update({f"w{w}r2": dict(cluster_split=False, pdl=True, static=True, prefetch_x=False, row_tiles=2,
                                 w_ahead=w) for w in (2, 3, 4)})  # and two row tiles per warp sharing x


def splits_for(m: int, n: int, k: int, fmt: FPFormat, choice: str) -> list:
    """The splits to time: the table's for this shape (else the split model's), or the listed ones."""
    if choice != "table":
        return [int(s) for s in choice.split(",")]
    measured = measured_small_m(m, n, k, fmt, torch.float16, "cuda")
    if measured is not None and measured.kernel == "small":
        return [measured.split]
    return [fpx_cuda.choose_split(n, k, m, torch.cuda.get_device_properties(0).multi_processor_count)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ms", default="1,8,16")
    parser.add_argument("--shapes", default="all")
    parser.add_argument("--splits", default="table", help="'table' (each shape's measured split) or a list")
    parser.add_argument("--variants", default="plain,cluster,pdl,cluster+pdl",
                        help=f"the first is the baseline; of {','.join(VARIANTS)}")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    unknown = [name for name in args.variants.split(",") if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    variants = {name: VARIANTS[name] for name in args.variants.split(",")}
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        parser.error("needs an sm_90 GPU (thread block clusters, programmatic dependent launch)")
    fmt = FPFormat.parse("e3m2")
    bandwidth = max(copy_bandwidth("cuda"), read_bandwidth("cuda"))
    shapes = shape_names(parser, args.shapes)
    rows, started = [], time.time()
    for name in shapes:
        n, k = SHAPES[name]
        qw = random_weight(n, k, fmt, "cuda")
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            dense, _ = dense_calls(n, k, m, torch.float16, "cuda")
            t_dense = time_calls(dense, replays=5) * 1e6
            del dense
            for split in splits_for(m, n, k, fmt, args.splits):
                row = {"shape": name, "n": n, "k": k, "m": m, "split": split, "cublas_us": t_dense, "equal": True}
                plain = None
                for variant, kw in variants.items():
                    if kw["cluster_split"] and not 2 <= split <= fpx_cuda.CLUSTER_SPLIT_MAX:
                        continue

                    def run(x, p, s, kw=kw, split=split):
                        kw = dict(kw)
                        with launch.static_weights() if kw.pop("static", False) else contextlib.nullcontext():
                            return fpx_cuda.fpx_small_m(x, p, s, None, fmt, n, k, split, **kw)
                    out = run(x, qw.planes, qw.scales)
                    plain = out if plain is None else plain
                    row["equal"] = row["equal"] and bool(torch.equal(out, plain))
                    calls, nbytes = rotating_calls(qw, m, torch.float16, run)
                    row[f"{variant}_us"] = time_calls(calls, replays=5) * 1e6
                    row["floor_us"] = nbytes / bandwidth * 1e6
                    del calls
                rows.append(row)
                timed = "  ".join(f"{v} {row[f'{v}_us']:6.1f} us ({row['floor_us'] / row[f'{v}_us']:.0%})"
                                  for v in variants if f"{v}_us" in row)
                print(f"{name:9} M={m:<3} split {split}: {timed}  cuBLAS {t_dense:6.1f} us  "
                      f"{'same sums' if row['equal'] else 'SUMS DIFFER'}", flush=True)
        del qw
        torch.cuda.empty_cache()
    base = next(iter(variants))
    for variant in list(variants)[1:]:
        ratios = [r[f"{base}_us"] / r[f"{variant}_us"] for r in rows if f"{variant}_us" in r]
        if ratios:
            geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
            print(f"{variant} over {base}: geo-mean {geo:.3f}x over {len(ratios)} cases "
                  f"({min(ratios):.3f}-{max(ratios):.3f}x)")
    if args.out:
        write_record(args.out, bandwidth=bandwidth, rows=rows, seconds=time.time() - started)
    return 0 if all(r["equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
