"""Launch the CUDA small-M kernel (or, with --mid, the mid-M kernel; with --wgmma, the wgmma kernel) a few times
on one shape, for ncu:

    ncu --clock-control none --kernel-name fpx_small_m --launch-skip 3 --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
        python3 bench/profile_cuda_small_m.py --n 8192 --k 8192 --m 1
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from kernel import random_weight  # noqa: E402

from fp6llm.formats import FPFormat  # noqa: E402
from fp6llm.kernels import fpx_cuda  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--n", type=int, default=8192)
parser.add_argument("--k", type=int, default=8192)
parser.add_argument("--m", type=int, default=1)
parser.add_argument("--split", type=int, default=None)
parser.add_argument("--mid", action="store_true", help="the mid-M kernel (fpx_mid_m)")
parser.add_argument("--wgmma", action="store_true", help="the wgmma kernel (fpx_wgmma)")
parser.add_argument("--n-x", type=int, default=None, help="the wgmma kernel's x rows per CTA")
parser.add_argument("--wgs", type=int, default=2, help="the wgmma kernel's warpgroups per CTA")
parser.add_argument("--x-ahead", type=int, default=2, help="the wgmma kernel's x tiles in flight")
parser.add_argument("--min-ctas", type=int, default=1, help="the wgmma kernel's CTAs per SM by registers")
parser.add_argument("--producer", action="store_true", help="the wgmma kernel's warp-specialized variant")
parser.add_argument("--row-tiles", type=int, default=1)
parser.add_argument("--warps", type=int, default=4)
parser.add_argument("--no-prefetch-x", action="store_true", help="the small-M kernel reads x at compute time")
args = parser.parse_args()
qw = random_weight(args.n, args.k, FPFormat.parse("e3m2"), "cuda")
x = torch.randn(args.m, args.k, device="cuda", dtype=torch.float16)
for _ in range(6):
    if args.wgmma:
        fpx_cuda.fpx_wgmma(x, qw.planes, qw.scales, None, qw.fmt, args.n, args.k, args.split, args.n_x, args.wgs,
                           x_ahead=args.x_ahead, min_ctas=args.min_ctas, producer=args.producer)
    elif args.mid:
        fpx_cuda.fpx_mid_m(x, qw.planes, qw.scales, None, qw.fmt, args.n, args.k, args.split, args.row_tiles,
                           args.warps)
    else:
        fpx_cuda.fpx_small_m(x, qw.planes, qw.scales, None, qw.fmt, args.n, args.k, args.split,
                             prefetch_x=not args.no_prefetch_x)
torch.cuda.synchronize()
if not args.mid and not args.wgmma:
    print("split", args.split or fpx_cuda.choose_split(args.n, args.k, args.m, 132))
