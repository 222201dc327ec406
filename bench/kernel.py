"""Kernel benchmark: TC-FPx (fpx_gemm) against cuBLAS FP16/BF16 (torch.matmul) on LLaMA layer shapes, one run.

    python bench/kernel.py [--shapes all|70b|13b] [--ms 1,2,4,...] [--formats e3m2,...] [--dtypes fp16,bf16]

Every case is checked against the PyTorch reference before it is timed. Times come from fp6llm/evals/timing.py (CUDA
graphs over rotating copies); the bandwidth floor is bytes moved (weights + scales + x + out) over the
device-to-device copy bandwidth measured in the same run. Writes bench/results/kernel-<device>-<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import time
from pathlib import Path

import torch

from fp6llm.evals.timing import copies_needed, copy_bandwidth, describe_device, read_bandwidth, time_calls
from fp6llm.formats import FPFormat
from fp6llm.kernels.dispatch import choose_config, device_key
from fp6llm.kernels.fpx_gemm import fpx_gemm
from fp6llm.packing import pack
from fp6llm.quantize import QuantizedWeight

SHAPES = {  # name: (N out, K in)
    "70b-qkv": (10240, 8192), "70b-o": (8192, 8192), "70b-up": (57344, 8192), "70b-down": (8192, 28672),
    "13b-qkv": (15360, 5120), "13b-o": (5120, 5120), "13b-up": (27648, 5120), "13b-down": (5120, 13824),
}
MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def shape_names(parser: argparse.ArgumentParser, choice: str) -> list:
    """The SHAPES names a --shapes argument asks for ("all" or comma-separated); parser.error for an unknown one."""
    names = list(SHAPES) if choice == "all" else choice.split(",")
    if unknown := [name for name in names if name not in SHAPES]:
        parser.error(f"unknown shape(s) {', '.join(unknown)}: choose from {', '.join(SHAPES)}")
    return names


def write_record(path, **fields) -> None:
    """A run's JSON record at ``path``: the GPU's name, today's date, then ``fields``."""
    Path(path).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"),
                                      **fields}, indent=1))


def random_weight(n: int, k: int, fmt: FPFormat, device) -> QuantizedWeight:
    """Random codes (every code value appears) and positive scales, packed on the device."""
    codes = torch.randint(0, fmt.num_codes, (n, k), dtype=torch.uint8, device=device)
    scales = torch.rand(n, device=device) * 0.01 + 0.001
    return QuantizedWeight(pack(codes, fmt), scales, fmt, (n, k), None)


def rotating_calls(qw: QuantizedWeight, m: int, dtype, linear):
    """Zero-argument calls linear(x, planes, scales) over enough copies of (weight, x) to defeat the L2, and the
    bytes one call moves."""
    n, k = qw.shape
    bytes_per_call = qw.nbytes + m * k * 2 + m * n * 2
    calls = []
    for i in range(copies_needed(bytes_per_call)):
        planes = qw.planes if i == 0 else tuple(p.clone() for p in qw.planes)
        scales = qw.scales if i == 0 else qw.scales.clone()
        x = torch.randn(m, k, device=qw.device, dtype=dtype)
        calls.append(lambda planes=planes, scales=scales, x=x: linear(x, planes, scales))
    return calls, bytes_per_call


def fpx_calls(qw: QuantizedWeight, m: int, dtype, config=None):
    """rotating_calls of the Triton kernel (fpx_gemm) with ``config`` (None: the dispatch table's)."""
    n, k = qw.shape
    return rotating_calls(qw, m, dtype, lambda x, planes, scales:
                          fpx_gemm(x, planes, scales, None, qw.fmt, n, k, None, config))


def dense_calls(n: int, k: int, m: int, dtype, device):
    bytes_per_call = n * k * 2 + m * k * 2 + m * n * 2
    calls = []
    for _ in range(copies_needed(bytes_per_call)):
        w = torch.randn(n, k, device=device, dtype=dtype)
        x = torch.randn(m, k, device=device, dtype=dtype)
        calls.append(lambda w=w, x=x: torch.matmul(x, w.T))
    return calls, bytes_per_call


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of ``out`` against ``ref`` (out taken to ref's dtype)."""
    return ((out.to(ref.dtype) - ref).norm() / ref.norm()).item()


def check(qw: QuantizedWeight, m: int, dtype, config=None) -> float:
    """Relative Frobenius error of fpx_gemm against the float32 reference on fresh random x (output poisoned)."""
    n, k = qw.shape
    x = torch.randn(m, k, device=qw.device, dtype=dtype)
    out = fpx_gemm(x, qw.planes, qw.scales, None, qw.fmt, n, k, None, config)
    ref = x.float() @ qw.dequantize(torch.float32).T
    err = rel_err(out, ref)
    if not math.isfinite(err) or err > 1e-2:
        raise AssertionError(f"fpx_gemm wrong: {qw.fmt.name} M={m} N={n} K={k} {dtype}: rel err {err:.3e}")
    return err


def run_case(name, n, k, m, fmt, dtype, bandwidth, cublas_twice=True):
    qw = random_weight(n, k, fmt, "cuda")
    err = check(qw, m, dtype)
    calls, fpx_bytes = fpx_calls(qw, m, dtype)
    t_fpx = time_calls(calls)
    del calls
    dense, dense_bytes = dense_calls(n, k, m, dtype, "cuda")
    t_dense = [time_calls(dense) for _ in range(2 if cublas_twice else 1)]
    del dense, qw
    torch.cuda.empty_cache()
    t_ref = statistics_median(t_dense)
    config = choose_config(m, n, k, fmt, dtype, None, "cuda")
    return {
        "shape": name, "n": n, "k": k, "m": m, "format": fmt.name, "dtype": str(dtype).split(".")[-1],
        "fpx_us": t_fpx * 1e6, "cublas_us": [t * 1e6 for t in t_dense], "speedup": t_ref / t_fpx,
        "fpx_floor": fpx_bytes / bandwidth / t_fpx, "cublas_floor": dense_bytes / bandwidth / t_ref,
        "tflops": 2 * m * n * k / t_fpx / 1e12, "rel_err": err, "config": config.__dict__,
    }


def statistics_median(values):
    values = sorted(values)
    return values[len(values) // 2] if len(values) % 2 else sum(values[len(values) // 2 - 1:][:2]) / 2


def geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


def markdown(rows, meta) -> str:
    lines = [f"# Kernel benchmark: {meta['device']['name']}, {meta['date']}", "",
             f"Bandwidth measured in this run: device-to-device copy {meta['copy_bandwidth_tbs']:.2f} TB/s "
             f"(read + write), reduction read {meta['read_bandwidth_tbs']:.2f} TB/s; the floor uses "
             f"{meta['floor_bandwidth_tbs']:.2f} TB/s. "
             "Times: median of 15 CUDA-graph replays of >= 16 back-to-back calls rotating over >= 256 MiB of "
             "operand copies. cuBLAS = torch.matmul with the same dtype, measured twice (both shown). "
             "floor = fraction of the bandwidth floor (bytes moved / copy bandwidth / time).", "",
             "| shape | N x K | M | fmt | dtype | fpx us | cuBLAS us (x2) | speedup | fpx floor | cuBLAS floor | TFLOP/s | config |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        c = r["config"]
        cfg = f"{c['block_m']}x{c['block_n']}x{c['block_k']} s{c['split_k']} w{c['num_warps']} st{c['num_stages']}" \
              + ("" if c["use_dot"] else " red") + (" dequant+cuBLAS" if c["dequant_first"] else "") \
              + (" swapAB" if c["swap_ab"] else "")
        lines.append(f"| {r['shape']} | {r['n']}x{r['k']} | {r['m']} | {r['format']} | {r['dtype']} | "
                     f"{r['fpx_us']:.1f} | {r['cublas_us'][0]:.1f} / {r['cublas_us'][-1]:.1f} | {r['speedup']:.2f}x | "
                     f"{r['fpx_floor']:.0%} | {r['cublas_floor']:.0%} | {r['tflops']:.0f} | {cfg} |")
    lines += ["", "## Summary (e3m2, fp16)", ""]
    main = [r for r in rows if r["format"] == "e3m2" and r["dtype"] == "float16"]
    for label, ms in (("M=1..16 geo-mean", (1, 2, 4, 8, 16)), ("M=32", (32,)), ("M=64", (64,)), ("M=128", (128,)),
                      ("M=256", (256,)), ("M>=512", (512, 1024, 4096))):
        sel = [r["speedup"] for r in main if r["m"] in ms]
        if sel:
            lines.append(f"- {label}: geo-mean speedup {geomean(sel):.2f}x (min {min(sel):.2f}x, max {max(sel):.2f}x)")
    m1 = [r for r in main if r["m"] == 1]
    if m1:
        lines.append("- M=1 fraction of bandwidth floor: " + ", ".join(f"{r['shape']} {r['fpx_floor']:.0%}" for r in m1))
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="all")
    parser.add_argument("--ms", default=",".join(map(str, MS)))
    parser.add_argument("--formats", default="e3m2")
    parser.add_argument("--dtypes", default="fp16")
    parser.add_argument("--extra", default="bf16:1,16,256;e2m3:1,16,256;e2m2:1,16;e3m1:1;e2m1:1,16",
                        help="extra cases on every shape: 'bf16:Ms' runs e3m2 with bf16, 'FMT:Ms' runs FMT in fp16")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)

    shapes = {k: v for k, v in SHAPES.items() if args.shapes == "all" or k.startswith(args.shapes)}
    ms = [int(m) for m in args.ms.split(",")]
    cases = [(name, fmt, DTYPES[d], m) for name in shapes for fmt in args.formats.split(",")
             for d in args.dtypes.split(",") for m in ms]
    for item in filter(None, args.extra.split(";")):
        what, extra_ms = item.split(":")
        fmt, dtype = ("e3m2", "bf16") if what == "bf16" else (what, "fp16")
        cases += [(name, fmt, DTYPES[dtype], int(m)) for name in shapes for m in extra_ms.split(",")]

    copy_bw, read_bw = copy_bandwidth(), read_bandwidth()
    bandwidth = max(copy_bw, read_bw)  # the floor uses the faster of the two measured streams
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s, read bandwidth {read_bw / 1e12:.2f} TB/s", flush=True)
    rows = []
    for name, fmt, dtype, m in cases:
        n, k = shapes[name]
        row = run_case(name, n, k, m, FPFormat.parse(fmt), dtype, bandwidth)
        rows.append(row)
        print(f"{name:9} M={m:<5} {fmt} {row['dtype']:8} fpx {row['fpx_us']:9.1f} us  cuBLAS "
              f"{row['cublas_us'][0]:9.1f}/{row['cublas_us'][-1]:9.1f} us  {row['speedup']:5.2f}x  "
              f"floor {row['fpx_floor']:.0%}", flush=True)

    meta = {"device": describe_device(), "date": datetime.date.today().isoformat(),
            "copy_bandwidth_tbs": copy_bw / 1e12, "read_bandwidth_tbs": read_bw / 1e12,
            "floor_bandwidth_tbs": bandwidth / 1e12}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"kernel-{device_key('cuda')}-{meta['date']}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"{stem}.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta)[-1500:])


if __name__ == "__main__":
    main()
