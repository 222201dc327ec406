"""The small-M kernel's split-K summed in a thread block cluster (fpx_small_m.cu, CLUSTER_SPLIT: the row block's
CTAs add each other's partials from shared memory) against the workspace path (partials to global memory, a fence,
an arrival counter, the last CTA sums), at each shape's split from the GPU's table, and against cuBLAS FP16 and the
bandwidth floor (the faster of the copy and read bandwidths measured in the run), in one run (CUDA graphs over rotating operand copies: fp6llm/evals/timing.py).

    python bench/cluster_split_ab.py [--ms 1,8,16] [--shapes all|13b-o,...] [--splits table|2,4,8] [--out FILE.json]

Needs an sm_90 GPU (clusters). Each case is checked against the workspace path (bit-identical sums) before it is
timed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel import SHAPES, dense_calls, random_weight, rotating_calls  # noqa: E402

from fp6llm.evals.timing import copy_bandwidth, read_bandwidth, time_calls  # noqa: E402
from fp6llm.formats import FPFormat  # noqa: E402
from fp6llm.kernels import fpx_cuda  # noqa: E402
from fp6llm.kernels.dispatch import measured_small_m  # noqa: E402


def splits_for(m: int, n: int, k: int, fmt: FPFormat, choice: str) -> list:
    """The splits to time: the table's for this shape (where it is 2..8), or the listed ones."""
    if choice != "table":
        return [int(s) for s in choice.split(",")]
    measured = measured_small_m(m, n, k, fmt, torch.float16, "cuda")
    split = measured.split if measured is not None and measured.kernel == "small" else \
        fpx_cuda.choose_split(n, k, m, torch.cuda.get_device_properties(0).multi_processor_count)
    return [split] if 2 <= split <= fpx_cuda.CLUSTER_SPLIT_MAX else []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ms", default="1,8,16")
    parser.add_argument("--shapes", default="all")
    parser.add_argument("--splits", default="table", help="'table' (each shape's measured split) or a list")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        parser.error("needs an sm_90 GPU (thread block clusters)")
    fmt = FPFormat.parse("e3m2")
    bandwidth = max(copy_bandwidth("cuda"), read_bandwidth("cuda"))  # the floor's, as bench/kernel_v2.py
    shapes = list(SHAPES) if args.shapes == "all" else args.shapes.split(",")
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
                row = {"shape": name, "n": n, "k": k, "m": m, "split": split, "cublas_us": t_dense}
                for cluster in (False, True):
                    def run(x, p, s, cluster=cluster, split=split):
                        return fpx_cuda.fpx_small_m(x, p, s, None, fmt, n, k, split, cluster_split=cluster)
                    row["equal" if cluster else "ref"] = run(x, qw.planes, qw.scales)
                    calls, nbytes = rotating_calls(qw, m, torch.float16, run)
                    t = time_calls(calls, replays=5) * 1e6
                    del calls
                    row["cluster_us" if cluster else "workspace_us"] = t
                    row["floor_us"] = nbytes / bandwidth * 1e6
                row["equal"] = bool(torch.equal(row.pop("ref"), row["equal"]))
                rows.append(row)
                print(f"{name:9} M={m:<3} split {split}: workspace {row['workspace_us']:6.1f} us  cluster "
                      f"{row['cluster_us']:6.1f} us ({row['workspace_us'] / row['cluster_us']:.3f}x)  cuBLAS "
                      f"{t_dense:6.1f} us  floor {row['floor_us']:5.1f} us ({row['floor_us'] / row['cluster_us']:.0%}"
                      f" of it clustered)  {'same sums' if row['equal'] else 'SUMS DIFFER'}", flush=True)
        del qw
        torch.cuda.empty_cache()
    if rows:
        ratios = [r["workspace_us"] / r["cluster_us"] for r in rows]
        geo = float(torch.tensor(ratios).log().mean().exp())
        print(f"cluster over workspace: geo-mean {geo:.3f}x over {len(rows)} cases "
              f"({min(ratios):.3f}-{max(ratios):.3f}x); sums equal in {sum(r['equal'] for r in rows)}")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"),
                                              "bandwidth": bandwidth, "rows": rows,
                                              "seconds": time.time() - started}, indent=1))
    return 0 if all(r["equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
