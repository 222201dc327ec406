"""A/B two sources of the CUDA small-M kernel on the device, same launches (the table's, else the model's):

    python bench/ab_source.py OTHER.cu [--ms 1,8]

Times the package's kernels/cuda/fpx_small_m.cu and OTHER.cu (the same macros; e.g. an earlier or a candidate
version, `git show REV:src/fp6llm/kernels/cuda/fpx_small_m.cu > /tmp/x.cu`, copied into the working tree so that
it travels) on the LLaMA shapes, each checked against the float32 reference first. ptxas is sensitive to code
around the main loop: a restructure for two row tiles per warp cost 3-14 % at M <= 8 (2026-12-02).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel import SHAPES, random_weight, rel_err, rotating_calls  # noqa: E402
from fp6llm.evals.timing import time_calls  # noqa: E402
from fp6llm.formats import FPFormat  # noqa: E402
from fp6llm.kernels import fpx_cuda  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other")
    parser.add_argument("--ms", default="1,8")
    args = parser.parse_args(argv)
    sources = {"package": fpx_cuda.SOURCE, "other": Path(args.other)}
    fmt = FPFormat.parse("e3m2")
    totals = {name: 0.0 for name in sources}
    for shape, (n, k) in SHAPES.items():
        qw = random_weight(n, k, fmt, "cuda")
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            ref = x.float() @ qw.dequantize(torch.float32).T
            times = {}
            for name, path in sources.items():
                fpx_cuda.SOURCE = path
                fpx_cuda._KERNELS.clear()
                out = fpx_cuda.fpx_small_m(x, qw.planes, qw.scales, None, fmt, n, k)
                err = rel_err(out, ref)
                assert err < 1e-2, (name, shape, m, err)
                calls, _ = rotating_calls(qw, m, torch.float16, lambda x, p, s: fpx_cuda.fpx_small_m(
                    x, p, s, None, fmt, n, k))
                times[name] = min(time_calls(calls, replays=7) for _ in range(2)) * 1e6
                totals[name] += times[name]
                del calls
            print(f"{shape:9} M={m:<3} " + "  ".join(f"{name} {t:7.1f} us" for name, t in times.items()) +
                  f"  other/package {times['other'] / times['package']:.3f}", flush=True)
        del qw
        torch.cuda.empty_cache()
    fpx_cuda.SOURCE = sources["package"]
    print("sum: " + "  ".join(f"{name} {t:.1f} us" for name, t in totals.items()) +
          f"  other/package {totals['other'] / totals['package']:.3f}")


if __name__ == "__main__":
    main()
