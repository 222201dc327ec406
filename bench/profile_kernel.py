"""Look inside one fpx_gemm case: its SASS instruction mix and (under ncu) its hardware counters.

    python bench/profile_kernel.py --n 8192 --k 8192 --m 1 --config 16,64,128,2,4,4 --sass OUT.sass
    ncu --kernel-name regex:fpx_gemm --launch-skip 3 --launch-count 1 --section SpeedOfLight \
        --section WarpStateStats python bench/profile_kernel.py ...

Writes the SASS of the compiled variant and prints a histogram of its opcodes, which says how many integer
instructions the de-quantization costs per weight.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel import random_weight  # noqa: E402

from fp6llm.formats import FPFormat  # noqa: E402
from fp6llm.kernels import fpx_gemm as gemm  # noqa: E402
from fp6llm.kernels.dispatch import KernelConfig  # noqa: E402


def sass_histogram(cubin: bytes, out_path: str | None):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run(["cuobjdump", "-sass", f.name], capture_output=True, text=True).stdout
    if out_path:
        Path(out_path).write_text(sass)
    ops = collections.Counter()
    for line in sass.splitlines():
        match = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", line)
        if match:
            ops[match.group(1).split(".")[0]] += 1
    return ops


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--k", type=int, default=8192)
    parser.add_argument("--m", type=int, default=1)
    parser.add_argument("--format", default="e3m2")
    parser.add_argument("--dtype", default="fp16")
    parser.add_argument("--config", default="16,64,128,2,4,4", help="block_m,block_n,block_k,split_k,warps,stages[,red]")
    parser.add_argument("--sass", default=None)
    parser.add_argument("--launches", type=int, default=5)
    args = parser.parse_args()
    parts = args.config.split(",")
    config = KernelConfig(*map(int, parts[:6]), use_dot=len(parts) < 7)
    fmt = FPFormat.parse(args.format)
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    qw = random_weight(args.n, args.k, fmt, "cuda")
    x = torch.randn(args.m, args.k, device="cuda", dtype=dtype)
    for _ in range(args.launches):
        gemm.fpx_gemm(x, qw.planes, qw.scales, None, fmt, args.n, args.k, None, config)
    torch.cuda.synchronize()
    for cache in gemm.fpx_gemm_kernel.device_caches.values():
        kernels = cache[0] if isinstance(cache, tuple) else cache
        for kernel in kernels.values():
            ops = sass_histogram(kernel.asm["cubin"], args.sass)
            total = sum(ops.values())
            print(f"regs={kernel.n_regs} spills={kernel.n_spills} shared={kernel.metadata.shared} SASS instructions={total}")
            print("  " + ", ".join(f"{op}:{count}" for op, count in ops.most_common(40)))


if __name__ == "__main__":
    main()
