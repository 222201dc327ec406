"""Host time per call of the ops an eager forward (a prefill) launches: each op called back to back on shapes so small
that the GPU keeps up, so the wall time per call is the host's (Python, dispatch, launch): through the torch custom
ops, the functions under them, and what a model calls (decoder_ops, FPxLinear: in eager mode on CUDA the kernels
without the ops' dispatch since 2026-12-04, launch.direct), so that the layers' costs separate.

    python bench/host_overhead.py [--calls 300] [--out FILE.json]

The prefill profile (bench/profile_prefill.py) showed the eager 13b prefill at batch 1 host-bound: 35 ms (FP16) and
63 ms (FP6) of wall time for 9-11 ms of kernels, on an H200 (2026-12-04).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel import write_record  # noqa: E402
import fp6llm.ops  # noqa: E402,F401  (registers fp6llm::fpx_linear)
from fp6llm import decoder_ops, quantize_weight  # noqa: E402
from fp6llm.nn import FPxLinear  # noqa: E402
from fp6llm.kernels import activation, fpx_cuda, fpx_gemm, launch, norm, x_order  # noqa: E402


def per_call_us(fn, calls: int) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - started
    torch.cuda.synchronize()
    return host / calls * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    gen = torch.Generator().manual_seed(0)
    dev, f16 = "cuda", torch.float16
    x = torch.randn(16, 1024, generator=gen).to(dev, f16)
    delta, weight = torch.randn_like(x), torch.randn(1024, generator=gen).to(dev, f16)
    gate_up = torch.randn(16, 2048, generator=gen).to(dev, f16)
    qw = quantize_weight(torch.randn(1024, 1024, generator=gen) * 0.03, "e3m2").to(dev)
    dense = torch.randn(1024, 1024, generator=gen).to(dev, f16)
    x1, x128 = x[:1].contiguous(), torch.randn(128, 1024, generator=gen).to(dev, f16)
    planes, n, k = list(qw.planes), 1024, 1024
    layer = FPxLinear(qw)
    ops = torch.ops.fp6llm
    cases = {
        "empty torch op (torch.empty_like)": lambda: torch.empty_like(x),
        "F.linear FP16 M=128": lambda: torch.nn.functional.linear(x128, dense),
        "fp6llm::add_norm op": lambda: ops.add_norm(x, delta, weight, None, 1e-6, True),
        "norm.add_norm (the op's CUDA impl)": lambda: norm.add_norm(x, delta, weight, None, 1e-6, True),
        "fp6llm::silu_mul op": lambda: ops.silu_mul(gate_up),
        "activation.silu_mul": lambda: activation.silu_mul(gate_up),
        "x_order.wgmma_x_order M=128": lambda: x_order.wgmma_x_order(x128),
        "fp6llm::fpx_linear op M=1": lambda: ops.fpx_linear(x1, planes, qw.scales, None, 3, 2, n, k, 0),
        "fpx_cuda.fpx_small_m M=1": lambda: fpx_cuda.fpx_small_m(x1, qw.planes, qw.scales, None, qw.fmt, n, k),
        "fp6llm::fpx_linear op M=128": lambda: ops.fpx_linear(x128, planes, qw.scales, None, 3, 2, n, k, 0),
        "fpx_cuda.fpx_wgmma M=128": lambda: fpx_cuda.fpx_wgmma(x128, qw.planes, qw.scales, None, qw.fmt, n, k),
        "fpx_gemm.fpx_gemm M=128": lambda: fpx_gemm.fpx_gemm(x128, qw.planes, qw.scales, None, qw.fmt, n, k, None),
        "decoder_ops.add_norm (what a model calls)": lambda: decoder_ops.add_norm(x, delta, weight, None, 1e-6, True),
        "decoder_ops.silu_mul": lambda: decoder_ops.silu_mul(gate_up),
        "FPxLinear M=1": lambda: layer(x1),
        "FPxLinear M=128": lambda: layer(x128),
    }
    from fp6llm.kernels import dispatch
    from fp6llm.kernels.workspace import WORKSPACE
    fmt, device = qw.fmt, x128.device
    kernel = fpx_cuda._wgmma_kernel(fmt, f16, 64, 1, False, device, 2, 3, False)[0]
    out = torch.empty(128, n, dtype=f16, device=dev)
    padded = planes + [planes[0]] * (3 - len(planes))
    kernel_args = [x128, x128.stride(0), *padded, qw.scales, qw.scales, out, out.stride(0), out, out, 128, n, k, 0.5,
                   k // 128]  # split 1: the workspace arguments are not read
    parts = {  # the pieces of an fpx_wgmma call
        "dispatch.measured_small_m": lambda: dispatch.measured_small_m(128, n, k, fmt, f16, device),
        "dispatch.small_m_backend": lambda: dispatch.small_m_backend(128, n, k, fmt, f16, device),
        "dispatch.device_key": lambda: dispatch.device_key(device),
        "fpx_cuda.wgmma_resolve": lambda: fpx_cuda.wgmma_resolve(128),
        "launch.enabled": lambda: launch.enabled(device),
        "fpx_cuda._wgmma_kernel (loaded)": lambda: fpx_cuda._wgmma_kernel(fmt, f16, 64, 1, False, device, 2, 3, False),
        "fpx_cuda.capability": lambda: fpx_cuda.capability(device),
        "fpx_cuda._takes": lambda: fpx_cuda._takes(fmt, None, x128, k, 4096),
        "torch.empty 128 x 1024": lambda: torch.empty(128, n, dtype=f16, device=dev),
        "WORKSPACE.reserve": lambda: WORKSPACE.reserve(device, 1 << 20, 64),
        "torch.cuda.current_stream().cuda_stream": lambda: torch.cuda.current_stream().cuda_stream,
        "fpx_cuda.launch_ex (the kernel launch)": lambda: fpx_cuda.launch_ex(
            kernel, (2, 16, 1), (128, 1, 1), kernel_args, fpx_cuda.wgmma_shared_bytes(64, 2)),
    }
    rows = {}
    for name, fn in parts.items():
        us = per_call_us(fn, args.calls)
        rows[f"part: {name}"] = us
        print(f"part: {name:50} {us:7.1f} us per call", flush=True)
    for pdl in (False, True):
        with launch.programmatic_launch(pdl):
            for name, fn in cases.items():
                us = per_call_us(fn, args.calls)
                rows[f"{name}, pdl {'on' if pdl else 'off'}"] = us
                print(f"{name:40} PDL {'on ' if pdl else 'off'}: {us:7.1f} us per call", flush=True)
    if args.out:
        write_record(args.out, calls=args.calls, us_per_call=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
