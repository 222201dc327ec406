"""The CUDA wgmma kernel (kernels/cuda/fpx_wgmma.cu) on the GPU at hand: a correctness sweep against the float64
reference, then timings against cuBLAS FP16 and the dispatched path (fpx_linear: Triton / de-quantize + cuBLAS)
at mid M on the LLaMA shapes, in one run (fp6llm/evals/timing.py: CUDA graphs over rotating operand copies).

    python bench/wgmma_probe.py [--ms 32,64,128,256,512] [--shapes all|70b-o,...] [--sweep split|pipeline|wide|producer|interleave]
                                [--out FILE.json]

--sweep wide: up to 256 rows of x per CTA (one or two warpgroups) against the 128-row launches, at M >= 256.
--sweep producer: the warp-specialized kernel (a producer warpgroup, two consumer warpgroups, x ring of 3 or 5
stages) against the table's launch and the 128-row one- and two-warpgroup launches.
--sweep interleave: each warpgroup de-quantizing k-step by k-step beside the wgmma before it (interleave) against
waiting for each tile's wgmma: the one-warpgroup plain launches, and at M >= 128 the producer kernel with two and
three consumers, x 2 and 4 tiles ahead.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel import SHAPES, dense_calls, random_weight, rotating_calls, shape_names, write_record  # noqa: E402
from tune import compile_wgmma  # noqa: E402

from fp6llm.evals.timing import time_calls  # noqa: E402
from fp6llm.formats import FPFormat  # noqa: E402
from fp6llm.kernels import fpx_cuda  # noqa: E402
from fp6llm.ops import fpx_linear  # noqa: E402
from fp6llm import quantize_weight  # noqa: E402


def check(quick: bool) -> list:
    """(case, relative error) of the wgmma kernel against x.double() @ W.T on fresh random inputs."""
    gen = torch.Generator().manual_seed(0)
    results = []
    cases = [("e3m2", torch.float16, 64, 64, 1, 2, {}), ("e3m2", torch.float16, 17, 24, 1, 2, {}),
             ("e3m2", torch.float16, 100, 104, 3, 2, {}), ("e3m2", torch.float16, 300, 128, 2, 2, {}),
             ("e3m2", torch.bfloat16, 64, 64, 2, 1, {}), ("e2m1", torch.float16, 33, 40, 1, 1, {}),
             ("e4m3", torch.bfloat16, 200, 192, 3, 2, {}), ("e2m3", torch.float16, 128, 128, 1, 2, {})]
    # the warp-specialized kernel: rings of 2 to 6 stages against 12 K tiles, split-K, partial x blocks
    cases += [("e3m2", torch.float16, 128, 128, 1, 2, dict(producer=True, x_ahead=2)),
              ("e3m2", torch.float16, 300, 128, 2, 2, dict(producer=True, x_ahead=3)),
              ("e3m2", torch.bfloat16, 77, 64, 3, 2, dict(producer=True, x_ahead=5)),
              ("e2m3", torch.float16, 40, 40, 1, 1, dict(producer=True, x_ahead=1)),
              ("e4m3", torch.bfloat16, 256, 128, 1, 2, dict(producer=True, x_ahead=4))]
    cases = cases[:3] if quick else cases
    sources = []
    for fmt, dtype, m, n_x, split, wgs, extra in cases:  # the kernels the checks launch, compiled at once
        launch = fpx_cuda.wgmma_resolve(m, n_x, wgs, extra.get("x_ahead"), None, extra.get("producer", False))
        sources.append(fpx_cuda.wgmma_kernel_source(FPFormat.parse(fmt), dtype == torch.bfloat16, n_x, m % 2 == 1,
                                                    wgs, launch["x_ahead"], launch["min_ctas"], False,
                                                    launch["producer"]))
    fpx_cuda.precompile(sources, fpx_cuda._arch("cuda"), fpx_cuda.WGMMA_KERNEL_NAME)
    for fmt, dtype, m, n_x, split, wgs, extra in cases:
        n, k = 200, 768 if not extra else 1536
        qw = quantize_weight(torch.randn(n, k, generator=gen) * 0.05, fmt).to("cuda")
        x = torch.randn(m, k, generator=gen).to("cuda", dtype)
        bias = torch.randn(n, generator=gen).to("cuda", dtype) if m % 2 else None
        ref = x.double() @ qw.dequantize(torch.float64).T + (0 if bias is None else bias.double())
        out = fpx_cuda.fpx_wgmma(x, qw.planes, qw.scales, bias, qw.fmt, n, k, split, n_x, wgs, **extra)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        same = True
        if extra:  # the plain kernel at the same split sums in the same order: bit-identical
            plain = fpx_cuda.fpx_wgmma(x, qw.planes, qw.scales, bias, qw.fmt, n, k, split, n_x, wgs)
            same = torch.equal(plain, out)
        results.append({"fmt": fmt, "dtype": str(dtype), "m": m, "n_x": n_x, "split": split, "wgs": wgs, **extra,
                        "err": err, "same_as_plain": same, "ok": err < 2e-2 and same})
        print(f"check {fmt} {dtype} M={m} n_x={n_x} split={split} wgs={wgs} {extra}: rel err {err:.2e}"
              + ("" if same else " DIFFERS from the plain kernel"), flush=True)
    return results


def launches_for(m: int, sweep: str) -> list:
    """(n_x, split, wgs, x_ahead, min_ctas[, producer[, w_ahead, interleave]]) to time at M."""
    n_xs = sorted({fpx_cuda.wgmma_n_x(m, most) for most in ((64, 128) if m > 64 else (64,))})
    if sweep == "producer":
        narrow = fpx_cuda.wgmma_n_x(m, 128)
        return ([(narrow, split, 1, xa, mc) for split in (1, 2) for xa, mc in ((1, 3), (2, 1))] + [(narrow, 1, 2, 1, 1)]
                + [(n_x, split, 2, xa, 1, True) for n_x in n_xs for split in (1, 2) for xa in (2, 4)])
    if sweep == "interleave":  # the same launches with and without the interleaved warpgroups
        narrow = fpx_cuda.wgmma_n_x(m, 128)
        plain = [(n_x, split, 1, xa, mc, False, 2, interleave) for n_x in n_xs for split in (1, 2)
                 for xa, mc in ((1, 3), (2, 3 if n_x <= 64 else 1)) for interleave in (False, True)]
        return plain + [(narrow, split, wgs, xa, 1, True, 2, interleave) for split in (1, 2) for wgs in (2, 3)
                        for xa in (2, 4) for interleave in (False, True) if m >= 128]
    if sweep == "wide":  # up to 256 rows of x per CTA (a 128 x 256 tile at two warpgroups) against the 128-row winners
        wide = fpx_cuda.wgmma_n_x(m, 256)
        narrow = fpx_cuda.wgmma_n_x(m, 128)
        return ([(narrow, split, 1, xa, mc) for split in (1, 2) for xa, mc in ((1, 3), (2, 1))]
                + [(narrow, split, 2, 1, 1) for split in (1, 2)]
                + [(wide, split, wgs, xa, 1) for split in (1, 2) for wgs in (1, 2) for xa in (1, 2)])
    if sweep == "pipeline":
        return [(n_x, split, wgs, xa, min_ctas) for n_x in n_xs for split in (1, 2) for xa in (1, 2)
                for wgs, min_ctas in (((1, 1), (1, 3), (1, 4), (4, 1)) if n_x <= 64 else ((1, 1), (1, 3)))]
    return [(n_x, split, 1, 1, 4 if n_x <= 64 else 3) for n_x in n_xs for split in (1, 2, 4)]


def timing(ms, shapes, sweep: str) -> list:
    rows = []
    compile_wgmma(("e3m2", False, l[0], *l[2:]) for m in ms for l in launches_for(m, sweep))
    for name in shapes:
        n, k = SHAPES[name]
        qw = random_weight(n, k, FPFormat.parse("e3m2"), "cuda")
        for m in ms:
            dense, _ = dense_calls(n, k, m, torch.float16, "cuda")
            t_dense = time_calls(dense, replays=5) * 1e6
            del dense
            calls, nbytes = rotating_calls(qw, m, torch.float16, lambda x, p, s: fpx_linear(x, qw.__class__(
                p, s, qw.fmt, qw.shape, None)))
            t_disp = time_calls(calls, replays=5) * 1e6
            del calls
            row = {"shape": name, "n": n, "k": k, "m": m, "cublas_us": t_dense, "dispatch_us": t_disp,
                   "wgmma": []}
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            ref = x.float() @ qw.dequantize(torch.float32).T
            for launch in launches_for(m, sweep):
                kw = dict(zip(("n_x", "split", "wgs", "x_ahead", "min_ctas", "producer", "w_ahead", "interleave"),
                              launch))
                out = fpx_cuda.fpx_wgmma(x, qw.planes, qw.scales, None, qw.fmt, n, k, **kw)
                err = ((out.float() - ref).norm() / ref.norm()).item()
                calls, _ = rotating_calls(qw, m, torch.float16, lambda x, p, s, kw=kw:
                                          fpx_cuda.fpx_wgmma(x, p, s, None, qw.fmt, n, k, **kw))
                t = time_calls(calls, replays=5) * 1e6
                del calls
                row["wgmma"].append(dict(kw, us=t, err=err))
            best = min(row["wgmma"], key=lambda r: r["us"])
            row["best"] = best
            print(f"{name:9} M={m:<4} cuBLAS {t_dense:7.1f}  dispatch {t_disp:7.1f} ({t_dense / t_disp:.2f}x)  "
                  f"wgmma best {best['us']:7.1f} ({t_dense / best['us']:.2f}x, {best}) all: "
                  + " ".join(f"{r['n_x']}/{r['split']}/g{r['wgs']}x{r['x_ahead']}c{r['min_ctas']}"
                             f"{'P' if r.get('producer') else ''}{'I' if r.get('interleave') else ''}:{r['us']:.0f}"
                             for r in row["wgmma"]), flush=True)
            rows.append(row)
        del qw
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ms", default="32,64,128,256,512")
    parser.add_argument("--shapes", default="all")
    parser.add_argument("--out")
    parser.add_argument("--check-only", action="store_true")
    parser.add_argument("--sweep", default="split", choices=["split", "pipeline", "wide", "producer",
                                                                          "interleave"])
    args = parser.parse_args(argv)
    started = time.time()
    checks = check(False)
    if not all(c["ok"] for c in checks):
        print("wgmma kernel WRONG", flush=True)
        return 1
    if args.check_only:
        return 0
    rows = timing([int(m) for m in args.ms.split(",")], shape_names(parser, args.shapes), args.sweep)
    if args.out:
        write_record(args.out, checks=checks, rows=rows, seconds=time.time() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
