"""The wgmma kernel with more K tiles of weights in flight (w_ahead, register buffers: 2 by default)
at the H200 table's launches, against cuBLAS FP16, in one run. An ablation at M = 16 (bench/wgmma_ablate.py
--small, 2026-12-04) had the kernel at 93 us on 57344 x 8192 with its de-quantization skipped, where reading the
weights takes ~82 us: it has too few bytes in flight (12 warps per SM, two 1.5 KB tiles each).

    python bench/wgmma_w_ahead.py [--ms 8,16,32] [--shapes all|70b-up,...] [--w-ahead 2,3,4] [--out FILE.json]

Each case is checked against the float32 reference before it is timed (CUDA graphs over rotating copies).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel import SHAPES, dense_calls, random_weight, rotating_calls, shape_names, write_record  # noqa: E402

from fp6llm.evals.timing import time_calls  # noqa: E402
from fp6llm.formats import FPFormat  # noqa: E402
from fp6llm.kernels import fpx_cuda  # noqa: E402
from fp6llm.kernels.dispatch import measured_small_m  # noqa: E402


def table_launch(m: int, n: int, k: int, fmt: FPFormat) -> dict:
    """The H200 table's wgmma launch for the case, else the kernel's default launch (split by the model)."""
    measured = measured_small_m(m, n, k, fmt, torch.float16, "cuda")
    if measured is not None and measured.kernel == "wgmma":
        return {f: getattr(measured, f) for f in ("split", "n_x", "wgs", "x_ahead", "min_ctas", "producer")}
    return dict(fpx_cuda.wgmma_launch(m), split=None, producer=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ms", default="8,16,32")
    parser.add_argument("--shapes", default="all")
    parser.add_argument("--w-ahead", default="2,3,4")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    fmt = FPFormat.parse("e3m2")
    depths = [int(v) for v in args.w_ahead.split(",")]
    ms, names = [int(v) for v in args.ms.split(",")], shape_names(parser, args.shapes)
    launches = {(m, name): table_launch(m, *SHAPES[name], fmt) for m in ms for name in names}
    sources = []
    for depth in depths:  # every kernel compiled first, in parallel
        sources += [fpx_cuda.wgmma_kernel_source(fmt, False, l["n_x"], False, l["wgs"], l["x_ahead"], l["min_ctas"],
                                                 True, l["producer"], depth) for l in launches.values()]
    fpx_cuda.precompile(sources, "sm_90a", fpx_cuda.WGMMA_KERNEL_NAME)
    rows, gains = [], {d: [] for d in depths}
    for m in ms:
        for name in names:
            n, k = SHAPES[name]
            qw = random_weight(n, k, fmt, "cuda")
            launch = launches[(m, name)]
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            ref = x.float() @ qw.dequantize(torch.float32).T
            times = {}
            for depth in depths:
                out = fpx_cuda.fpx_wgmma(x, qw.planes, qw.scales, None, fmt, n, k, **launch, w_ahead=depth)
                err = ((out.float() - ref).norm() / ref.norm()).item()
                if not err < 1e-2:
                    raise AssertionError(f"W_AHEAD {depth} wrong: {name} M={m} {launch}: rel err {err:.3e}")
                calls, _ = rotating_calls(qw, m, torch.float16, lambda x, p, s: fpx_cuda.fpx_wgmma(
                    x, p, s, None, fmt, n, k, **launch, w_ahead=depth))
                times[depth] = time_calls(calls, replays=5) * 1e6
                del calls
            dense, _ = dense_calls(n, k, m, torch.float16, "cuda")
            cublas = time_calls(dense, replays=5) * 1e6
            del dense
            for depth in depths:
                gains[depth].append(times[depths[0]] / times[depth])
            rows.append(dict(m=m, shape=name, launch=launch, cublas_us=cublas,
                             **{f"w_ahead_{d}_us": t for d, t in times.items()}))
            print(f"{name:9} M={m:<3} {launch}: " + "  ".join(f"W{d} {t:6.1f} us ({cublas / t:.2f}x)"
                                                            for d, t in times.items()) + f"  cuBLAS {cublas:.1f}",
                  flush=True)
            del qw
            torch.cuda.empty_cache()
    for depth in depths[1:]:
        geo = math.exp(sum(math.log(g) for g in gains[depth]) / len(gains[depth]))
        print(f"W_AHEAD {depth} over {depths[0]}: geo-mean {geo:.3f}x over {len(gains[depth])} cases "
              f"({min(gains[depth]):.3f}-{max(gains[depth]):.3f}x)")
    if args.out:
        write_record(args.out, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
