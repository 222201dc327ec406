"""What reading a weight's bytes costs by itself: the fastest plain read kernel of each shape's FP6 and FP16 bytes,
back to back in a CUDA graph over rotating copies (as bench/kernel.py times the GEMMs), against the bandwidth
floor (bytes / the read bandwidth of a 2 GiB reduction) that issue 12's ">= 85 % of the floor at M = 1" is
measured by, and the small-M kernel (its measured table launch, M = 1) and cuBLAS FP16 in the same run.

A short kernel pays its launch, its first loads' latency and its last wave's tail whatever it computes; this says
how much of the floor a kernel that only reads can reach at each size, so that the GEMMs' fraction of the floor can
be read against what reading alone reaches.

    python bench/read_floor.py [--shapes all|13b-o,...] [--out FILE.json]

The read kernel: each program reads ITERS x BLOCK contiguous int32 words (128-bit loads, the L1 bypassed) and
stores their sum; a grid covers the buffer once. Configurations: BLOCK 2048 or 4096 words, ITERS 1-16, 4 or 8
warps; the fastest per size is reported. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel import SHAPES, dense_calls, random_weight, rotating_calls, shape_names, write_record  # noqa: E402

from fp6llm.evals.timing import copies_needed, read_bandwidth, time_calls  # noqa: E402
from fp6llm.formats import FPFormat  # noqa: E402
from fp6llm.kernels import fpx_cuda  # noqa: E402

CONFIGS = [(block, iters, warps) for block in (2048, 4096) for iters in (1, 4, 16) for warps in (4, 8)]


@triton.jit
def _read_kernel(src, out, n_words, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * BLOCK * ITERS
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in tl.static_range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(src + offs, mask=offs < n_words, other=0, cache_modifier=".cg")
    tl.store(out + tl.program_id(0), tl.sum(acc, axis=0))


def read_calls(nbytes: int, block: int, iters: int, warps: int) -> list:
    """Zero-argument read launches over enough copies of an nbytes buffer to defeat the L2."""
    n_words = nbytes // 64 * 16  # a multiple of 16 words: Triton's 128-bit loads
    grid = triton.cdiv(n_words, block * iters)
    calls = []
    for _ in range(copies_needed(nbytes)):
        src = torch.randint(-2**30, 2**30, (n_words,), dtype=torch.int32, device="cuda")
        out = torch.empty(grid, dtype=torch.int32, device="cuda")
        calls.append(lambda src=src, out=out: _read_kernel[(grid,)](src, out, n_words, BLOCK=block, ITERS=iters,
                                                                    num_warps=warps))
    return calls


def check_read_kernel() -> None:
    """The read kernel sums what it reads (so it cannot be a no-op): per-program sums against torch."""
    n_words, block, iters = 3 * 4096 * 4 + 100, 4096, 4
    src = torch.randint(-1000, 1000, (n_words,), dtype=torch.int32, device="cuda")
    grid = triton.cdiv(n_words, block * iters)
    out = torch.empty(grid, dtype=torch.int32, device="cuda")
    _read_kernel[(grid,)](src, out, n_words, BLOCK=block, ITERS=iters, num_warps=4)
    padded = torch.nn.functional.pad(src, (0, grid * block * iters - n_words))
    expected = padded.view(grid, -1).sum(dim=1, dtype=torch.int64).to(torch.int32)
    if not torch.equal(out, expected):
        raise AssertionError("the read kernel's sums differ from torch's")


def best_read_us(nbytes: int) -> "tuple[float, tuple]":
    best = None
    for config in CONFIGS:
        t = time_calls(read_calls(nbytes, *config), replays=5) * 1e6
        if best is None or t < best[0]:
            best = (t, config)
        torch.cuda.empty_cache()
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="all")
    parser.add_argument("--format", default="e3m2")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    shapes = shape_names(parser, args.shapes)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    check_read_kernel()
    fmt = FPFormat.parse(args.format)
    bandwidth = read_bandwidth("cuda")
    print(f"read bandwidth (2 GiB reduction): {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows = []
    for name in shapes:
        n, k = SHAPES[name]
        qw = random_weight(n, k, fmt, "cuda")
        calls, fp6_bytes = rotating_calls(qw, 1, torch.float16,
                                          lambda x, p, s: fpx_cuda.fpx_small_m(x, p, s, None, fmt, n, k))
        t_fp6 = time_calls(calls, replays=5) * 1e6
        del calls
        dense, fp16_bytes = dense_calls(n, k, 1, torch.float16, "cuda")
        t_dense = time_calls(dense, replays=5) * 1e6
        del dense, qw
        torch.cuda.empty_cache()
        row = {"shape": name, "n": n, "k": k, "fp6_bytes": fp6_bytes, "fp16_bytes": fp16_bytes,
               "small_m_us": t_fp6, "cublas_us": t_dense}
        for label, nbytes in (("fp6", fp6_bytes), ("fp16", fp16_bytes)):
            t, config = best_read_us(nbytes)
            row[f"read_{label}_us"], row[f"read_{label}_config"] = t, config
            row[f"floor_{label}_us"] = nbytes / bandwidth * 1e6
        rows.append(row)
        read6, floor6, read16, floor16 = (row[key] for key in ("read_fp6_us", "floor_fp6_us", "read_fp16_us",
                                                                "floor_fp16_us"))
        print(f"{name:9} {n}x{k}: FP6 bytes read {read6:6.1f} us ({floor6 / read6:4.0%} of the floor), small-M M=1 "
              f"{t_fp6:6.1f} us ({floor6 / t_fp6:4.0%}; {read6 / t_fp6:4.0%} of the read) | FP16 bytes read "
              f"{read16:6.1f} us ({floor16 / read16:4.0%}), cuBLAS {t_dense:6.1f} us ({floor16 / t_dense:4.0%}; "
              f"{read16 / t_dense:4.0%} of the read)", flush=True)
    if args.out:
        write_record(args.out, bandwidth=bandwidth, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
