"""Kernel v2 on the device, one run: correctness of the CUDA small-M kernel and the Triton kernel (layout 2) against
the float reference, then times at M <= 16 against cuBLAS FP16/BF16 on the LLaMA-2 13B/70B layer shapes.

    python bench/kernel_v2.py [--ms 1,2,4,8,16] [--quick] [--out DIR]

Times: fp6llm/evals/timing.py (CUDA graphs of >= 16 back-to-back calls over rotating operand copies, median of replays).
floor = (weight + scale + x + out bytes) / the faster of the copy and read bandwidths measured in this run / time.
Writes kernel-v2-<device>-<date>.json (and .md) to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from kernel import SHAPES, dense_calls, geomean, random_weight, rel_err, rotating_calls  # noqa: E402
from fp6llm.evals.timing import copy_bandwidth, describe_device, read_bandwidth, time_calls  # noqa: E402

from fp6llm.formats import FPFormat  # noqa: E402
from fp6llm.kernels import fpx_cuda  # noqa: E402
from fp6llm.kernels.dispatch import device_key, heuristic_config  # noqa: E402
from fp6llm.kernels import fpx_gemm as gemm_module  # noqa: E402
from fp6llm.kernels.fpx_gemm import fpx_gemm  # noqa: E402
import fp6llm.ops  # noqa: E402,F401  (registers torch.ops.fp6llm.fpx_linear: the "dispatch" rows)
from fp6llm.quantize import quantize_weight  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
BLOCK_VARIANTS = ()  # set by --blocks
FMA_SHIFTS_AB = False  # set by --fma-shifts
IMAD_ROTATE_AB = False  # set by --imad-rotate


def correctness(quick: bool) -> list:
    """Every format the kernel takes, both dtypes, M across the two n8 blocks, split-K on and off, bias."""
    rows = []
    torch.manual_seed(0)
    formats = ["e3m2", "e2m3", "e2m2", "e2m1", "e3m1", "e4m3", "e1m2", "e2m4"]
    for fmt in formats[:3] if quick else formats:
        for dtype in (torch.float16, torch.bfloat16):
            for m in (1, 3, 8, 9, 16):
                for n, k, split in ((200, 384, None), (4096, 4096, 1), (4096, 4096, 4), (1000, 1280, 3)):
                    w = torch.randn(n, k, device="cuda") * 0.05
                    qw = quantize_weight(w, fmt)
                    x = torch.randn(m, k, device="cuda", dtype=dtype)
                    bias = torch.randn(n, device="cuda", dtype=dtype) if m % 2 else None
                    ref = x.double() @ qw.dequantize(torch.float64).T
                    if bias is not None:
                        ref = ref + bias.double()
                    cuda_out = fpx_cuda.fpx_small_m(x, qw.planes, qw.scales, bias, qw.fmt, n, k, split)
                    triton_out = fpx_gemm(x, qw.planes, qw.scales, bias, qw.fmt, n, k, None)
                    errs = (rel_err(cuda_out, ref), rel_err(triton_out, ref))
                    if FMA_SHIFTS_AB:  # the variant must be right too
                        errs += (rel_err(fpx_cuda.fpx_small_m(x, qw.planes, qw.scales, bias, qw.fmt, n, k, split,
                                                              fma_shifts=not fpx_cuda.FMA_SHIFTS), ref),)
                    limit = 4e-3 if dtype == torch.float16 else 2e-2
                    ok = all(math.isfinite(e) and e < limit for e in errs)
                    rows.append({"fmt": fmt, "dtype": str(dtype)[6:], "m": m, "n": n, "k": k, "split": split,
                                 "cuda_err": errs[0], "triton_err": errs[1], "cuda_ab_err": errs[2:3] or None,
                                 "ok": ok})
                    if not ok:
                        print(f"WRONG {rows[-1]}", flush=True)
    bad = [r for r in rows if not r["ok"]]
    print(f"correctness: {len(rows) - len(bad)}/{len(rows)} cases within tolerance; max CUDA err "
          f"{max(r['cuda_err'] for r in rows):.2e}, max Triton err {max(r['triton_err'] for r in rows):.2e}", flush=True)
    return rows


def calls_for(qw, m, dtype, kernel, min_blocks=None, fma_shifts=None, imad_rotate=None):
    """kernel.rotating_calls of the CUDA small-M kernel ("cuda", with min_blocks and fma_shifts, default: the
    module's) or the Triton kernel ("triton", with imad_rotate, default: the module's)."""
    n, k = qw.shape
    if kernel == "dispatch":  # what fpx_linear runs: the table's pick of the small-M, mid-M and Triton kernels
        return rotating_calls(qw, m, dtype, lambda x, p, s: torch.ops.fp6llm.fpx_linear(
            x, list(p), s, None, qw.fmt.exp_bits, qw.fmt.man_bits, n, k, 0))
    if kernel == "triton":
        rotate = gemm_module.ROTATE_BY_MULTIPLY if imad_rotate is None else imad_rotate
        return rotating_calls(qw, m, dtype, lambda x, p, s: fpx_gemm(x, p, s, None, qw.fmt, n, k, None,
                                                                     imad_rotate=rotate))
    blocks = fpx_cuda.MIN_BLOCKS if min_blocks is None else min_blocks
    shifts = fpx_cuda.FMA_SHIFTS if fma_shifts is None else fma_shifts
    return rotating_calls(qw, m, dtype, lambda x, p, s: fpx_cuda.fpx_small_m(x, p, s, None, qw.fmt, n, k,
                                                                             min_blocks=blocks, fma_shifts=shifts))


def timing(ms, cases, bandwidth) -> list:
    rows = []
    for name, (n, k) in SHAPES.items():
        for fmt_name, dtype_name, case_ms in cases:
            fmt, dtype = FPFormat.parse(fmt_name), DTYPES[dtype_name]
            qw = random_weight(n, k, fmt, "cuda")
            for m in [m for m in ms if m in case_ms]:
                row = {"shape": name, "n": n, "k": k, "m": m, "format": fmt.name, "dtype": dtype_name}
                for kernel in ("cuda", "triton", "dispatch"):
                    calls, nbytes = calls_for(qw, m, dtype, kernel)
                    row[f"{kernel}_us"] = time_calls(calls) * 1e6
                    row[f"{kernel}_floor"] = nbytes / bandwidth / (row[f"{kernel}_us"] / 1e6)
                    del calls
                for blocks in BLOCK_VARIANTS:  # A/B of __launch_bounds__ minimum CTAs per SM
                    calls, _ = calls_for(qw, m, dtype, "cuda", blocks)
                    row[f"cuda_b{blocks}_us"] = time_calls(calls) * 1e6
                    del calls
                if FMA_SHIFTS_AB:  # A/B of the left shifts by kernel-parameter multipliers
                    calls, _ = calls_for(qw, m, dtype, "cuda", fma_shifts=not fpx_cuda.FMA_SHIFTS)
                    row["cuda_fma_shifts_ab_us"] = time_calls(calls) * 1e6
                    del calls
                if IMAD_ROTATE_AB:  # A/B of the Triton kernel's field moves by multiplies
                    calls, _ = calls_for(qw, m, dtype, "triton", imad_rotate=not gemm_module.ROTATE_BY_MULTIPLY)
                    row["triton_imad_rotate_ab_us"] = time_calls(calls) * 1e6
                    del calls
                dense, dense_bytes = dense_calls(n, k, m, dtype, "cuda")
                row["cublas_us"] = time_calls(dense) * 1e6
                row["cublas_floor"] = dense_bytes / bandwidth / (row["cublas_us"] / 1e6)
                del dense
                row["cuda_speedup"] = row["cublas_us"] / row["cuda_us"]
                row["triton_speedup"] = row["cublas_us"] / row["triton_us"]
                row["dispatch_speedup"] = row["cublas_us"] / row["dispatch_us"]
                row["split"] = None  # chosen inside fpx_small_m from the kernel's registers
                row["triton_config"] = str(heuristic_config(m, n, k, 132))
                rows.append(row)
                variants = " ".join(f"b{b} {row[f'cuda_b{b}_us']:.1f}" for b in BLOCK_VARIANTS)
                if FMA_SHIFTS_AB:
                    variants += f" fma_shifts={not fpx_cuda.FMA_SHIFTS} {row['cuda_fma_shifts_ab_us']:.1f}"
                if IMAD_ROTATE_AB:
                    variants += f" triton imad_rotate={not gemm_module.ROTATE_BY_MULTIPLY} " \
                                f"{row['triton_imad_rotate_ab_us']:.1f}"
                print(f"{name:9} M={m:<3} {fmt.name} {dtype_name}  cuda {row['cuda_us']:7.1f} us ({row['cuda_floor']:4.0%}) [{variants}]"
                      f"  triton {row['triton_us']:7.1f} us ({row['triton_floor']:4.0%})  cuBLAS {row['cublas_us']:7.1f} us"
                      f" ({row['cublas_floor']:4.0%})  cuda {row['cuda_speedup']:.2f}x  triton {row['triton_speedup']:.2f}x"
                      f"  dispatched {row['dispatch_us']:.1f} us {row['dispatch_speedup']:.2f}x",
                      flush=True)
            del qw
            torch.cuda.empty_cache()
    return rows


def timing_mid(ms, bandwidth) -> list:
    """The Triton path above M = 16 (swap-AB tensor cores, de-quantize + cuBLAS at large M) against cuBLAS."""
    rows = []
    for name in ("70b-o", "70b-up", "13b-qkv"):
        n, k = SHAPES[name]
        qw = random_weight(n, k, FPFormat.parse("e3m2"), "cuda")
        for m in ms:
            calls, nbytes = calls_for(qw, m, torch.float16, "triton")
            t = time_calls(calls) * 1e6
            del calls
            dense, _ = dense_calls(n, k, m, torch.float16, "cuda")
            t_dense = time_calls(dense) * 1e6
            del dense
            rows.append({"shape": name, "m": m, "triton_us": t, "cublas_us": t_dense, "speedup": t_dense / t,
                         "config": str(heuristic_config(m, n, k, 132))})
            variant = ""
            if IMAD_ROTATE_AB:  # A/B of the field moves by multiplies
                calls, _ = calls_for(qw, m, torch.float16, "triton", imad_rotate=not gemm_module.ROTATE_BY_MULTIPLY)
                rows[-1]["imad_rotate_ab_us"] = time_calls(calls) * 1e6
                del calls
                variant = f"  [imad_rotate={not gemm_module.ROTATE_BY_MULTIPLY} {rows[-1]['imad_rotate_ab_us']:.1f} us]"
            print(f"{name:9} M={m:<5} triton {t:8.1f} us  cuBLAS {t_dense:8.1f} us  {t_dense / t:.2f}x{variant}",
                  flush=True)
        del qw
        torch.cuda.empty_cache()
    return rows


def summary(rows) -> str:
    lines = []
    main = [r for r in rows if r["format"] == "e3m2" and r["dtype"] == "fp16"]
    for kernel in ("cuda", "triton", "dispatch"):
        sel = [r[f"{kernel}_speedup"] for r in main if r["m"] <= 16 and f"{kernel}_speedup" in r]
        m1 = [r for r in main if r["m"] == 1]
        if sel:
            lines.append(f"{kernel}: e3m2 fp16 M<=16 geo-mean {geomean(sel):.2f}x cuBLAS (min {min(sel):.2f}, max "
                         f"{max(sel):.2f}); M=1 floor " + ", ".join(f"{r['shape']} {r[f'{kernel}_floor']:.0%}" for r in m1))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ms", default="1,2,4,8,16")
    parser.add_argument("--quick", action="store_true", help="three formats in the correctness sweep")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--blocks", default="", help="extra __launch_bounds__ minimum CTAs per SM to time, e.g. 7,8")
    parser.add_argument("--fma-shifts", action="store_true",
                        help="also check and time the CUDA kernel with the other fma_shifts setting")
    parser.add_argument("--imad-rotate", action="store_true",
                        help="also time the Triton kernel with the other imad_rotate setting (small and mid M)")
    parser.add_argument("--mid", default="32,128,512,4096", help="M of the Triton-path rows ('' for none)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    started = time.time()
    global BLOCK_VARIANTS, FMA_SHIFTS_AB, IMAD_ROTATE_AB
    BLOCK_VARIANTS = tuple(int(b) for b in args.blocks.split(",") if b)
    FMA_SHIFTS_AB, IMAD_ROTATE_AB = args.fma_shifts, args.imad_rotate
    checks = correctness(args.quick)
    copy_bw, read_bw = copy_bandwidth(), read_bandwidth()
    bandwidth = max(copy_bw, read_bw)
    print(f"copy {copy_bw / 1e12:.2f} TB/s, read {read_bw / 1e12:.2f} TB/s", flush=True)
    ms = [int(m) for m in args.ms.split(",")]
    cases = [("e3m2", "fp16", ms), ("e3m2", "bf16", [1, 16]), ("e2m3", "fp16", [1]), ("e2m1", "fp16", [1])]
    rows = [] if args.skip_timing else timing(ms, cases, bandwidth)
    mid = [] if args.skip_timing or not args.mid else timing_mid([int(m) for m in args.mid.split(",")], bandwidth)
    meta = {"device": describe_device(), "date": datetime.date.today().isoformat(), "copy_bandwidth_tbs": copy_bw / 1e12,
            "read_bandwidth_tbs": read_bw / 1e12, "seconds": time.time() - started}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"kernel-v2-{device_key('cuda')}-{meta['date']}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "correctness": checks, "rows": rows, "mid": mid}, indent=1))
    text = summary(rows)
    (out / f"{stem}.md").write_text(f"# Kernel v2, {meta['device']['name']}, {meta['date']}\n\n{text}\n")
    print(text)
    return 0 if all(r["ok"] for r in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
