"""BF16 de-quantized straight to BF16 registers (fpx_cuda.BF16_DIRECT: the FP16 pattern's magnitude 3 bits lower,
value x 2^(bias - 127)) against the FP16 pattern converted pair by pair (two f16 -> f32 conversions and a pack),
the same launches in one run: the small-M kernel at M = 1/8/16 (each shape's table split, else the model's) and
the wgmma kernel's default launch at M = 64/128, against cuBLAS BF16 and the bandwidth floor.

    python bench/bf16_direct_ab.py [--formats e3m2,e2m3,e2m1] [--ms 1,8,16] [--wgmma-ms 64,128] [--shapes all|...]
                                   [--out FILE.json]

Machine code (sm_90a, M <= 8, per loop pass of two tiles): e3m2 449 against 473 instructions (the sign's own move
and shifts that were free in FP16 eat most of the 192 conversions), e2m3 393 / 473, e2m1 253 / 429; whether fewer
instructions with more of them on the ALU pipe is faster is what this measures. Each case is checked against the
float32 reference first. Needs an sm_90 GPU (where BF16_DIRECT applies).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel import SHAPES, dense_calls, random_weight, rel_err, rotating_calls  # noqa: E402

from fp6llm.evals.timing import copy_bandwidth, read_bandwidth, time_calls  # noqa: E402
from fp6llm.formats import FPFormat  # noqa: E402
from fp6llm.kernels import fpx_cuda  # noqa: E402


def kernel_call(kind: str, fmt: FPFormat, n: int, k: int, direct: bool):
    if kind == "small":
        return lambda x, p, s: fpx_cuda.fpx_small_m(x, p, s, None, fmt, n, k, direct=direct)
    return lambda x, p, s: fpx_cuda.fpx_wgmma(x, p, s, None, fmt, n, k, direct=direct)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="e3m2,e2m3,e2m1")
    parser.add_argument("--ms", default="1,8,16")
    parser.add_argument("--wgmma-ms", default="64,128")
    parser.add_argument("--shapes", default="all")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        parser.error("needs an sm_90 GPU")
    bandwidth = max(copy_bandwidth("cuda"), read_bandwidth("cuda"))
    shapes = list(SHAPES) if args.shapes == "all" else args.shapes.split(",")
    cases = [("small", int(m)) for m in args.ms.split(",") if m] + \
        [("wgmma", int(m)) for m in args.wgmma_ms.split(",") if m]
    rows, started, ok = [], time.time(), True
    for name in args.formats.split(","):
        fmt = FPFormat.parse(name)
        for shape in shapes:
            n, k = SHAPES[shape]
            qw = random_weight(n, k, fmt, "cuda")
            w32 = qw.dequantize(torch.float32)
            for kind, m in cases:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = x.float() @ w32.T
                row = {"format": name, "shape": shape, "n": n, "k": k, "m": m, "kernel": kind}
                for variant, direct in (("direct", True), ("convert", False)):
                    run = kernel_call(kind, fmt, n, k, direct)
                    row[f"{variant}_err"] = rel_err(run(x, qw.planes, qw.scales), ref)
                    ok = ok and row[f"{variant}_err"] < 2e-2
                    calls, nbytes = rotating_calls(qw, m, torch.bfloat16, run)
                    row[f"{variant}_us"] = time_calls(calls, replays=5) * 1e6
                    row["floor_us"] = nbytes / bandwidth * 1e6
                    del calls
                dense, _ = dense_calls(n, k, m, torch.bfloat16, "cuda")
                row["cublas_us"] = time_calls(dense, replays=5) * 1e6
                del dense
                rows.append(row)
                print(f"{name} {shape:9} {kind:5} M={m:<4} direct {row['direct_us']:7.1f} us "
                      f"({row['floor_us'] / row['direct_us']:.0%}, {row['cublas_us'] / row['direct_us']:.2f}x cuBLAS)"
                      f"  convert {row['convert_us']:7.1f} us ({row['cublas_us'] / row['convert_us']:.2f}x)  "
                      f"direct/convert {row['convert_us'] / row['direct_us']:.3f}x  "
                      f"err {row['direct_err']:.1e} / {row['convert_err']:.1e}", flush=True)
            del qw, w32
            torch.cuda.empty_cache()
    for name in args.formats.split(","):
        for kind in ("small", "wgmma"):
            ratios = [r["convert_us"] / r["direct_us"] for r in rows if r["format"] == name and r["kernel"] == kind]
            if ratios:
                geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
                print(f"{name} {kind}: direct over convert geo-mean {geo:.3f}x over {len(ratios)} cases "
                      f"({min(ratios):.3f}-{max(ratios):.3f}x)")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(0),
                                              "date": time.strftime("%Y-%m-%d"), "bandwidth": bandwidth,
                                              "rows": rows, "seconds": time.time() - started}, indent=1))
    if not ok:
        print("WRONG: a case is off the float32 reference")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
