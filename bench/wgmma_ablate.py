"""Where the wgmma kernel's time goes: the same launch with the de-quantization skipped (ABLATE 1: raw plane words
as A) and with the wgmma skipped (ABLATE 2), against the full kernel; if full ~ (1) + (2), the two do not overlap.

    python bench/wgmma_ablate.py [--producer | --small]   (on the device; timings only, the ablated outputs are
        garbage; --producer: the warp-specialized cases alone; --small: M = 16, the table's launches and the
        warp-specialized kernel with one or two consumers)
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel import SHAPES, random_weight, rotating_calls  # noqa: E402

from fp6llm.evals.timing import time_calls  # noqa: E402
from fp6llm.formats import FPFormat  # noqa: E402
from fp6llm.kernels import fpx_cuda  # noqa: E402

CASES = [("70b-up", 128, dict(n_x=128, wgs=1, x_ahead=1, min_ctas=3, split=1)),
         ("70b-up", 64, dict(n_x=64, wgs=1, x_ahead=1, min_ctas=4, split=1)),
         ("70b-o", 256, dict(n_x=128, wgs=1, x_ahead=1, min_ctas=3, split=1)),
         ("70b-up", 128, dict(n_x=128, wgs=2, x_ahead=1, min_ctas=1, split=1)),
         # the warp-specialized variant (a producer warpgroup copies x; two consumer warpgroups)
         ("70b-o", 256, dict(n_x=128, wgs=2, x_ahead=2, min_ctas=1, split=1, producer=True)),
         ("70b-up", 256, dict(n_x=128, wgs=2, x_ahead=2, min_ctas=1, split=1, producer=True))]
# M = 16: the H200 table's launches (2026-12-04), and a producer warpgroup beside one or two consumers instead
SMALL = [(name, 16, dict(n_x=16, wgs=1, x_ahead=2, min_ctas=3, split=split))
         for name, split in (("70b-up", 1), ("70b-qkv", 3), ("13b-o", 4))]
SMALL += [(name, 16, dict(n_x=16, wgs=wgs, x_ahead=3, min_ctas=ctas, split=split, producer=True))
          for name, split in (("70b-up", 1), ("70b-qkv", 3), ("13b-o", 4)) for wgs, ctas in ((1, 3), (2, 2))]
if len(sys.argv) > 1 and sys.argv[1] == "--producer":
    CASES = [case for case in CASES if case[2].get("producer")]
elif len(sys.argv) > 1 and sys.argv[1] == "--small":
    CASES = SMALL
for name, m, launch in CASES:
    n, k = SHAPES[name]
    qw = random_weight(n, k, FPFormat.parse("e3m2"), "cuda")
    times = []
    for ablate in (0, 1, 2):
        fpx_cuda.WGMMA_EXTRA_DEFINES[:] = [f"#define ABLATE {ablate}"] if ablate else []
        calls, _ = rotating_calls(qw, m, torch.float16, lambda x, p, s: fpx_cuda.fpx_wgmma(x, p, s, None, qw.fmt, n,
                                                                                           k, **launch))
        times.append(time_calls(calls, replays=5) * 1e6)
        del calls
    print(f"{name} M={m} {launch}: full {times[0]:.1f} us, no de-quantization {times[1]:.1f}, no wgmma "
          f"{times[2]:.1f} (sum of the two {times[1] + times[2]:.1f})", flush=True)
    del qw
    torch.cuda.empty_cache()
fpx_cuda.WGMMA_EXTRA_DEFINES[:] = []
