"""Regenerate the measured dispatch table (src/fp6llm/kernels/configs/<gpu>.json) on the GPU at hand.

    python bench/tune.py [--shapes all] [--ms 1,2,...] [--formats e3m2,...] [--dtypes fp16,bf16] [--out DIR]
    python bench/tune.py --cuda-only --ms 16,32,64,128   # add the CUDA kernels' launches to the file's entries
    python bench/tune.py --wgmma-only --ms 32,...,512     # add the wgmma kernel's launches where they are faster

For each format and dtype (one table each in the GPU's file; dispatch.table_for says which table a case without its
own uses), each LLaMA layer shape and each M bucket it times every candidate configuration (fp6llm/evals/timing.py,
fewer replays than bench/kernel.py) and keeps the fastest. It also prints, per compiled variant, the
registers, spills and whether the PTX uses wgmma (Hopper's warpgroup MMA) or mma.sync.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel import MS, SHAPES, check, dense_calls, fpx_calls, random_weight, rel_err, rotating_calls  # noqa: E402
from fp6llm.evals.timing import time_calls  # noqa: E402

from fp6llm.formats import FPFormat  # noqa: E402
from fp6llm.kernels import fpx_cuda  # noqa: E402
from fp6llm.kernels import fpx_gemm as gemm_module  # noqa: E402
from fp6llm.kernels.dispatch import CONFIG_DIR, KernelConfig, device_key, m_bucket, tables_in  # noqa: E402
from fp6llm.kernels.launch import enabled as pdl_enabled  # noqa: E402


def candidates(m: int):
    """Configurations worth timing for this M (pruned by the sweeps kept in docs/: tune-*.log, sweep-*.log)."""
    if m <= 16:
        for bn, bk, warps, stages, split, swap in (
                (64, 128, 4, 4, 1, False), (64, 128, 4, 4, 2, False), (64, 128, 4, 4, 4, False),
                (64, 128, 4, 5, 4, False), (32, 128, 4, 4, 2, False),
                (64, 128, 4, 4, 2, True), (64, 128, 4, 4, 4, True), (128, 128, 4, 4, 2, True)):
            yield KernelConfig(16, bn, bk, split, warps, stages, swap_ab=swap)
    elif m <= 64:
        for bn, bk, warps, stages, split, swap in (
                (64, 128, 4, 4, 2, False), (128, 128, 4, 4, 1, True), (128, 128, 4, 4, 2, True),
                (64, 128, 4, 4, 2, True), (128, 128, 8, 3, 1, True)):
            yield KernelConfig(m, bn, bk, split, warps, stages, swap_ab=swap)
    else:
        yield KernelConfig(64, 64, 128, dequant_first=True)
        # Layout 2 needs block_k >= 128. Register and shared-memory use per candidate (sm_90a, e3m2, compiled on a
        # CPU, 2026-12-02): 128x128 8 warps 181 regs, 120 KB, 3.6 ALU lane-ops per weight; 128x256 8 warps 201
        # regs, 88 KB, 2.9; 64x128 4 warps 211 regs, 100 KB, 2.95; 256x128 8 warps 239 regs, 140 KB, 4.2.
        # Narrow weight tiles (block_n 64) with two warpgroups de-quantize the same rows twice (8.2 ALU): left out.
        # A weight of 8192 channels has only 64 tiles of 128: split K (or narrow tiles) to fill 132 SMs.
        for bm, bn, warps, stages, split in ((128, 128, 8, 3, 1), (128, 128, 8, 3, 2), (128, 256, 8, 2, 1),
                                             (128, 256, 8, 3, 1), (64, 128, 4, 4, 1), (64, 128, 4, 4, 2),
                                             (256, 128, 8, 2, 1), (128, 64, 4, 3, 2)):
            if bm <= m:
                yield KernelConfig(bm, bn, 128, split, warps, stages, swap_ab=True)


def compiled_report():
    """Registers, spills and MMA flavour of every compiled fpx_gemm_kernel variant."""
    lines = []
    caches = getattr(gemm_module.fpx_gemm_kernel, "device_caches", {})
    for cache in caches.values():
        kernels = cache[0] if isinstance(cache, tuple) else cache
        for key, kernel in kernels.items():
            ptx = kernel.asm.get("ptx", "")
            consts = {k: v for k, v in getattr(kernel, "src", None).constants.items()} \
                if hasattr(getattr(kernel, "src", None), "constants") else {}
            lines.append(f"regs={kernel.n_regs} spills={kernel.n_spills} wgmma={'wgmma' in ptx} "
                         f"mma.sync={'mma.sync' in ptx} shared={kernel.metadata.shared} {consts}")
    return lines


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
CUDA_SPLITS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24)


WRONG: list = []  # (kernel, format, M, N, K, dtype, launch, relative error) of launches that gave wrong sums


def time_launches(qw, m: int, dtype, kernel, launches) -> "list | None":
    """[(seconds, launch), ...] fastest first, of fpx_cuda's ``kernel`` ("fpx_small_m", "fpx_mid_m" or
    "fpx_wgmma") at each launch (keyword arguments), each checked against the float32 reference before it is
    timed; None where the kernel does not take the case or no launch gave the right sums. A launch with wrong sums
    is printed (WRONG), kept out of the results and recorded in WRONG, and the run goes on: main exits 1 at the
    end (the launches built without a device were first tuned so, 2026-12-05)."""
    n, k = qw.shape
    x = torch.randn(m, k, device=qw.device, dtype=dtype)
    takes = {"fpx_small_m": fpx_cuda.supports, "fpx_mid_m": fpx_cuda.mid_supports,
             "fpx_wgmma": fpx_cuda.wgmma_supports}[kernel]
    if not takes(qw.fmt, qw.group_size, x, n, k):
        return None
    run = getattr(fpx_cuda, kernel)
    ref = x.float() @ qw.dequantize(torch.float32).T
    launch = {}  # the calls read the loop's current launch when they run
    calls, _ = rotating_calls(qw, m, dtype, lambda x, p, s: run(x, p, s, None, qw.fmt, n, k, **launch))
    results = []
    for launch in launches:
        err = rel_err(run(x, qw.planes, qw.scales, None, qw.fmt, n, k, **launch), ref)
        if not err < 1e-2:
            print(f"WRONG {kernel}: {qw.fmt.name} M={m} N={n} K={k} {dtype} {launch}: rel err {err:.3e} "
                  f"(not timed, not in the table)", flush=True)
            WRONG.append((kernel, qw.fmt.name, m, n, k, str(dtype), dict(launch), err))
            continue
        results.append((time_calls(calls, replays=5), launch))
    return sorted(results, key=lambda r: r[0]) or None


def _splits(k: int, choices) -> list:
    """The split-K degrees of ``choices`` that leave every CTA >= 4 K tiles (the workspace's reservation)."""
    return [s for s in choices if s <= max(1, k // fpx_cuda.TILE_K // 4)]


def tune_cuda(qw, m: int, dtype) -> "dict | None":
    """The CUDA small-M kernel's fastest launch (split x prefetch_x, two row tiles per warp sharing x, on sm_90
    splits of 2..8 summed in a cluster, then 3-4 weight tiles in registers per warp at the three fastest splits)
    for this weight and M, as the table's "cuda" entry; None where the kernel does not take the case."""
    n, k = qw.shape
    # every field given: the table's entry for this case must not fill one in (its row tiles beside prefetch_x)
    launches = [dict(split=split, prefetch_x=prefetch_x, row_tiles=1, cluster_split=False, w_ahead=2)
                for prefetch_x in (True, False) for split in _splits(k, CUDA_SPLITS)]
    launches += [dict(split=split, prefetch_x=False, row_tiles=2, cluster_split=False, w_ahead=2)
                 for split in _splits(k, CUDA_SPLITS)]
    if torch.cuda.get_device_capability() >= (9, 0):
        launches += [dict(split=split, prefetch_x=True, row_tiles=1, cluster_split=True, w_ahead=2)
                     for split in _splits(k, CUDA_SPLITS) if 2 <= split <= fpx_cuda.CLUSTER_SPLIT_MAX]
    results = time_launches(qw, m, dtype, "fpx_small_m", launches)
    if results is None:
        return None
    # then 3 and 4 weight tiles in registers per warp (built 2026-12-05, not yet timed), at the three fastest splits
    # so far and half the fastest (more bytes in flight per warp may want fewer splits); x a tile ahead or not up to
    # 8 rows (and summed in a cluster), above only at compute time (x ahead there: 190-234 registers, 2 CTAs per SM),
    # one or two row tiles per warp
    best = list(dict.fromkeys(launch["split"] for _, launch in results))[:3]
    best += [half for half in _splits(k, CUDA_SPLITS) if half == max(1, best[0] // 2) and half not in best]
    rings = [dict(split=split, prefetch_x=prefetch_x, row_tiles=1, cluster_split=False, w_ahead=w_ahead)
             for w_ahead in SMALL_W_AHEADS for prefetch_x in ((True, False) if m <= 8 else (False,)) for split in best]
    if m > 8:  # ... two row tiles per warp sharing x (M = 16: rt2 nb2 w_ahead 3 keeps 6 CTAs of 2 warps, 168 registers)
        rings += [dict(split=split, prefetch_x=False, row_tiles=2, cluster_split=False, w_ahead=w_ahead)
                  for w_ahead in SMALL_W_AHEADS for split in best]
    if torch.cuda.get_device_capability() >= (9, 0):  # ... and summed in a cluster (x ahead, as in the first round)
        rings += [dict(split=split, prefetch_x=True, row_tiles=1, cluster_split=True, w_ahead=w_ahead)
                  for w_ahead in SMALL_W_AHEADS for split in best if 2 <= split <= fpx_cuda.CLUSTER_SPLIT_MAX
                  and m <= 8]
    results = sorted(results + (time_launches(qw, m, dtype, "fpx_small_m", rings) or []), key=lambda r: r[0])
    print(f"  cuda M={m} {n}x{k}: " + ", ".join(f"{t * 1e6:.1f}us s{l['split']}{'' if l['prefetch_x'] else 'x'}"
                                                f"{'c' if l.get('cluster_split') else ''}"
                                                f"{'r2' if l.get('row_tiles', 1) > 1 else ''}"
                                                f"{'w%d' % l['w_ahead'] if l['w_ahead'] != 2 else ''}"
                                                for t, l in results), flush=True)
    t, launch = results[0]
    return dict(launch, us=round(t * 1e6, 1))


SMALL_W_AHEADS = (3, 4)  # the small-M kernel's deeper weight rings the tuner times (fpx_cuda.SMALL_W_AHEADS)


# The mid-M kernel's launches worth timing: (row_tiles, warps); registers (sm_90a, e3m2, FP16, compiled on a CPU,
# 2026-12-02) at 16 / 32 / 64 rows of x: one row tile 64 / 80 / 125, two 122 / 128 / 179.
MID_SHAPES = ((1, 4), (2, 4), (1, 8), (2, 8))
MID_SPLITS = (1, 2, 3, 4, 6, 8)


def tune_mid(qw, m: int, dtype) -> "dict | None":
    """The CUDA mid-M kernel's fastest launch (rows of x per CTA x row_tiles x warps x split) for this weight and M;
    None where the kernel does not take the case."""
    n, k = qw.shape
    # all rows of x in one CTA; above 16 rows also 16 per CTA (grid z blocks reading the same weights, L2 hits)
    results = time_launches(qw, m, dtype, "fpx_mid_m", [
        dict(split=split, row_tiles=row_tiles, warps=warps, blocks=blocks)
        for blocks in ((fpx_cuda.MID_MAX_BLOCKS_M, 2) if m > 16 else (fpx_cuda.MID_MAX_BLOCKS_M,))
        for row_tiles, warps in MID_SHAPES for split in _splits(k, MID_SPLITS)])
    if results is None:
        return None
    print(f"  mid M={m} {n}x{k}: " + ", ".join(f"{t * 1e6:.1f}us s{l['split']}r{l['row_tiles']}w{l['warps']}"
                                               f"b{l['blocks']}" for t, l in results[:8]), flush=True)
    t, launch = results[0]
    best = {"kernel": "mid", **launch, "us": round(t * 1e6, 1)}
    if launch["blocks"] == fpx_cuda.MID_MAX_BLOCKS_M:  # the default: not written
        del best["blocks"]
    return best


WGMMA_SPLITS = (1, 2, 3, 4)
WGMMA_TUNE_MAX_M = 512  # the largest M bucket the CUDA kernels are timed at (the wgmma kernel's)
WGMMA_TUNE_MIN_M = 8  # the wgmma kernel is timed from M = 8 (8 rows of x per CTA; from M = 9 until 2026-12-04, when
# its split-K launches won every shape at M = 16)


def wgmma_launches(m: int) -> list:
    """The wgmma kernel's launches worth timing at M (bench/wgmma_probe.py's runs, H200, 2026-12-02): up to 64 and
    up to 128 rows of x per CTA, one warpgroup with x one tile ahead and registers for 3-4 CTAs per SM, or x two
    tiles ahead (more shared memory, fewer CTAs), or two warpgroups; at <= 64 rows also four warpgroups (256 weight
    rows share each copy of x: a quarter of one warpgroup's x traffic, which bound it at M = 128) or two
    warpgroups with registers for two CTAs; above 128 rows also two warpgroups on up to 256 rows of x (a 128 x 256
    tile: each copy of x serves 128 weight rows, each weight 256 rows of x). Above WGMMA_TUNE_MAX_M (prefill; only
    where asked, --wgmma-only) the two-warpgroup 256-row launches and the producer ones: what the kernel could win
    with there, against de-quantizing into cuBLAS."""
    if m > WGMMA_TUNE_MAX_M:
        wide, narrow = fpx_cuda.wgmma_n_x(m, 256), fpx_cuda.wgmma_n_x(m, 128)
        return [dict(n_x=wide, wgs=2, x_ahead=x_ahead, min_ctas=1, producer=False, w_ahead=2, interleave=False)
                for x_ahead in (1, 2)] + [
            dict(n_x=wide, wgs=2, x_ahead=2, min_ctas=1, producer=True, w_ahead=2, interleave=interleave)
            for interleave in (False, True)] + [
            dict(n_x=narrow, wgs=wgs, x_ahead=x_ahead, min_ctas=1, producer=True, w_ahead=2, interleave=interleave)
            for wgs in (2, 3) for x_ahead in (2, 4) for interleave in (False, True)]
    shapes = []
    for n_x in sorted({fpx_cuda.wgmma_n_x(m, most) for most in ((64, 128) if m > 64 else (64,))}):
        shapes += [dict(n_x=n_x, wgs=1, x_ahead=1, min_ctas=4 if n_x <= 64 else 3),
                   dict(n_x=n_x, wgs=1, x_ahead=2, min_ctas=3 if n_x <= 64 else 1),
                   dict(n_x=n_x, wgs=2, x_ahead=1, min_ctas=1)]
        if n_x <= 64:
            shapes += [dict(n_x=n_x, wgs=4, x_ahead=1, min_ctas=1), dict(n_x=n_x, wgs=4, x_ahead=2, min_ctas=1),
                       dict(n_x=n_x, wgs=2, x_ahead=1, min_ctas=2)]
    if m > 128:  # 128 weight rows x up to 256 rows of x per CTA (bench/wgmma_probe.py --sweep wide, 2026-12-03)
        wide = fpx_cuda.wgmma_n_x(m, 256)
        shapes += [dict(n_x=wide, wgs=2, x_ahead=1, min_ctas=1), dict(n_x=wide, wgs=2, x_ahead=2, min_ctas=1)]
        # a producer warpgroup copying x for two consumer warpgroups (wgmma_probe.py --sweep producer, 2026-12-04:
        # 1-3 % faster than the plain launches at M = 256 on 5 of 5 shapes)
        shapes += [dict(n_x=fpx_cuda.wgmma_n_x(m, 128), wgs=2, x_ahead=2, min_ctas=1, producer=True)]
        # ... and for two consumers on up to 256 rows of x, the producer's registers handed to them (setmaxnreg,
        # 168 -> 40 / 232: 128 accumulators each; not yet timed, 2026-12-04)
        shapes += [dict(n_x=wide, wgs=2, x_ahead=2, min_ctas=1, producer=True)]
    if m >= 128:  # three consumers beside a producer, its registers handed to them (setmaxnreg; not yet timed,
        # 2026-12-04: from M = 128 the kernel is bound by its MMAs, and at most two consumers fitted an SM before)
        shapes += [dict(n_x=fpx_cuda.wgmma_n_x(m, 128), wgs=3, x_ahead=x_ahead, min_ctas=1, producer=True)
                   for x_ahead in (2, 4)]
    # up to 64 rows of x, the one-warpgroup launches also with four weight tiles in flight per warp (not yet timed,
    # 2026-12-04: at M = 16 the kernel took 93 us on 57344 x 8192 with its de-quantization skipped, where reading
    # the weights takes ~82 us; no spills at these launches)
    shapes += [dict(shape, w_ahead=4) for shape in shapes if shape["n_x"] <= 64 and shape["wgs"] == 1
               and not shape.get("producer") and fpx_cuda.wgmma_registers_fit(shape["n_x"], 1, shape["min_ctas"],
                                                                              w_ahead=4)]
    # the producer launches also with each k-step de-quantized beside the wgmma of the ones before it, and at M = 128
    # two consumers so (not yet timed, 2026-12-04: each consumer waited for its tile's 8 wgmma before de-quantizing
    # the next, so the tensor cores drained every tile; the producer kernel took 57.5 us on 70b-o at M = 256 with
    # no de-quantization at all, cuBLAS 52)
    shapes += [dict(shape, interleave=True) for shape in shapes if shape.get("producer") and shape["x_ahead"] >= 2]
    # ... and from M = 16 the plain launches so (one more tile of x in shared memory: where it fits; at 16-32 rows of
    # x each tile's wait for its wgmma is ~a fifth of the tile, exposed where the SM's other CTAs do not cover it)
    shapes += [dict(shape, interleave=True) for shape in shapes
               if not shape.get("producer") and not shape.get("interleave") and m >= 16
               and shape.get("w_ahead", 2) == 2
               and fpx_cuda.wgmma_shared_bytes(shape["n_x"], shape["x_ahead"], True) <= fpx_cuda.WGMMA_MAX_SHARED - 256]
    if m == 128:
        shapes += [dict(n_x=128, wgs=2, x_ahead=2, min_ctas=1, producer=True, interleave=True)]
    # every field given: a table entry for the case must not fill in its producer or weight tiles beside these
    return [dict(shape, producer=shape.get("producer", False), w_ahead=shape.get("w_ahead", 2),
                 interleave=shape.get("interleave", False)) for shape in shapes]


def compile_wgmma(specs) -> None:
    """Compile the wgmma kernels of ``specs`` ((format name, bf16, n_x, wgs, x_ahead, min_ctas[, producer[,
    w_ahead[, interleave]]]), ...) in parallel (fpx_cuda.precompile) into the disk cache the launches then load from: with
    programmatic dependent launch where the launches take it (compiled without it, they would all compile again,
    one at a time, as they run)."""
    pdl = pdl_enabled("cuda")
    fpx_cuda.precompile([fpx_cuda.wgmma_kernel_source(FPFormat.parse(name), bf16, n_x, False, wgs, x_ahead, min_ctas,
                                                      pdl, *rest)
                         for name, bf16, n_x, wgs, x_ahead, min_ctas, *rest in set(specs)],
                        "sm_90a", fpx_cuda.WGMMA_KERNEL_NAME)


def prewarm_wgmma(fmt: FPFormat, dtype, ms) -> None:
    """Compile every wgmma launch the tuning will time (compile_wgmma)."""
    compile_wgmma((fmt.name, dtype == torch.bfloat16, l["n_x"], l["wgs"], l["x_ahead"], l["min_ctas"],
                   l.get("producer", False), l.get("w_ahead", 2), l.get("interleave", False))
                  for m in ms if WGMMA_TUNE_MIN_M <= m <= fpx_cuda.WGMMA_MAX_M for l in wgmma_launches(m))


def tune_wgmma(qw, m: int, dtype) -> "dict | None":
    """The CUDA wgmma kernel's fastest launch (wgmma_launches x split) for this weight and M; None where the kernel
    does not take the case (not sm_90)."""
    n, k = qw.shape
    # only the splits fpx_wgmma keeps (it clamps to the reserved partials)
    results = time_launches(qw, m, dtype, "fpx_wgmma", [
        dict(shape, split=split) for shape in wgmma_launches(m) for split in _splits(k, WGMMA_SPLITS)
        if split <= fpx_cuda.grid_split_cap(n, m, k, 64 * shape["wgs"], shape["n_x"])])
    if results is None:
        return None
    print(f"  wgmma M={m} {n}x{k}: " + ", ".join(f"{t * 1e6:.1f}us s{l['split']}n{l['n_x']}g{l['wgs']}"
                                                 f"x{l['x_ahead']}c{l['min_ctas']}{'P' if l.get('producer') else ''}"
                                                 f"{'' if l.get('w_ahead', 2) == 2 else 'w' + str(l['w_ahead'])}"
                                                 f"{'I' if l.get('interleave') else ''}"
                                                 for t, l in results[:8]),
          flush=True)
    t, launch = results[0]
    return {"kernel": "wgmma", **launch, "us": round(t * 1e6, 1)}


def cublas_seconds(n: int, k: int, m: int, dtype) -> float:
    """cuBLAS FP16/BF16 (torch.matmul) on the same shape: the same-run baseline of every printed line."""
    dense, _ = dense_calls(n, k, m, dtype, "cuda")
    return time_calls(dense, replays=5)


def best_cuda(qw, m: int, dtype) -> "dict | None":
    """The fastest of the CUDA small-M (M <= 16), mid-M (M <= 128) and wgmma (sm_90, M >= 9) kernels' best
    launches, as the entry's "cuda"."""
    found = [r for r in (tune_cuda(qw, m, dtype) if m <= fpx_cuda.MAX_M else None,
                         tune_mid(qw, m, dtype) if m <= fpx_cuda.MID_MAX_M else None,
                         tune_wgmma(qw, m, dtype) if m >= WGMMA_TUNE_MIN_M else None)
             if r is not None]
    return min(found, key=lambda r: r["us"]) if found else None


def small_m_specs(ms, hopper: bool) -> set:
    """(n8 blocks of x rows, prefetch_x, row_tiles, cluster split, w_ahead) of every small-M kernel tune_cuda's
    launches load at ``ms``: both rounds, every cluster split one may run as on sm_90 (fpx_cuda.cluster_of)."""
    clusters = range(2, fpx_cuda.CLUSTER_SPLIT_MAX + 1) if hopper else ()
    specs = set()
    for blocks in sorted({1 if m <= 8 else 2 for m in ms if m <= fpx_cuda.MAX_M}):
        specs |= {(blocks, prefetch_x, 1, 0, 2) for prefetch_x in (True, False)} | {(blocks, False, 2, 0, 2)}
        specs |= {(blocks, True, 1, cluster, 2) for cluster in clusters}
        if blocks == 1:  # the rings: x ahead or not, and in a cluster
            specs |= {(blocks, prefetch_x, 1, 0, w) for prefetch_x in (True, False) for w in SMALL_W_AHEADS}
            specs |= {(blocks, True, 1, cluster, w) for cluster in clusters for w in SMALL_W_AHEADS}
        else:  # x at compute time, one or two row tiles
            specs |= {(blocks, False, row_tiles, 0, w) for row_tiles in (1, 2) for w in SMALL_W_AHEADS}
    return specs


def small_m_sources(fmt: FPFormat, dtype, ms, hopper: bool, pdl: bool) -> list:
    """small_m_specs' kernel sources as fpx_small_m builds them (no bias, the default registers and shifts; its
    early weights only inside launch.static_weights, which the tuner does not enter)."""
    early = pdl and fpx_cuda.EARLY_WEIGHTS and fpx_cuda.launch.weights_static()
    return [fpx_cuda.kernel_source(fmt, dtype == torch.bfloat16, blocks, False, fpx_cuda.MIN_BLOCKS, False,
                                   prefetch_x, cluster, pdl, early, row_tiles, w)
            for blocks, prefetch_x, row_tiles, cluster, w in sorted(small_m_specs(ms, hopper))]


def prewarm_small(fmt: FPFormat, dtype, ms) -> None:
    """Compile the small-M kernels the tuning will time, in parallel, into the disk cache (NVRTC: 2-30 s a kernel,
    one core each; the launches then only load them)."""
    hopper = torch.cuda.get_device_capability() >= (9, 0)
    fpx_cuda.precompile(small_m_sources(fmt, dtype, ms, hopper, pdl_enabled("cuda") and hopper),
                        fpx_cuda._arch("cuda"), fpx_cuda.KERNEL_NAME)


def tune_table(fmt: FPFormat, dtype: torch.dtype, ms, shapes: str, table: dict, cuda_too: bool = True,
               cuda_only: bool = False, wgmma_only: bool = False, saved=None) -> dict:
    """The fastest candidate per M bucket and shape for one format and dtype, merged into ``table``; up to M =
    WGMMA_TUNE_MAX_M also the CUDA kernels' fastest launch (the entry's "cuda": dispatch.small_m_backend picks the
    faster).
    cuda_only: keep ``table``'s Triton entries (they must be there) and time the CUDA kernels alone; wgmma_only:
    time the wgmma kernel alone and keep the faster of it and the entry's "cuda" launch. saved(): called after
    each shape's entry is in ``table`` (main writes the file: a run cut short keeps what it measured)."""
    if cuda_too and not wgmma_only:
        prewarm_small(fmt, dtype, ms)
    if cuda_too and torch.cuda.get_device_capability() == (9, 0):
        prewarm_wgmma(fmt, dtype, ms)
    for m in ms:
        for name, (n, k) in SHAPES.items():
            if shapes != "all" and not name.startswith(shapes):
                continue
            qw = random_weight(n, k, fmt, "cuda")
            if cuda_only:
                entry = table[str(m_bucket(m))][f"{n}x{k}"]
                cuda = tune_wgmma(qw, m, dtype) if wgmma_only else best_cuda(qw, m, dtype)
                if wgmma_only and isinstance(entry.get("cuda"), dict) and cuda is not None \
                        and entry["cuda"]["us"] < cuda["us"]:
                    cuda = entry["cuda"]  # the earlier CUDA launch stays: faster
                if cuda is not None:
                    entry["cuda"] = cuda
                    if saved is not None:
                        saved()
                    t_dense = cublas_seconds(n, k, m, dtype)
                    print(f"M={m:<5} {name:9} {fmt.name} {str(dtype)[6:]} cuBLAS {t_dense * 1e6:.1f}us | triton "
                          f"{entry['us']:.1f}us ({t_dense / entry['us'] * 1e6:.2f}x) | cuda {cuda}"
                          f" ({t_dense / cuda['us'] * 1e6:.2f}x)", flush=True)
                del qw
                torch.cuda.empty_cache()
                continue
            results = []
            for config in candidates(m):
                try:
                    check(qw, m, dtype, config)
                    calls, _ = fpx_calls(qw, m, dtype, config)
                    results.append((time_calls(calls, replays=5), config))
                    del calls
                except Exception as err:  # a config the compiler rejects (shared memory, registers) is skipped
                    print(f"  skip {config}: {type(err).__name__}: {str(err)[:120]}", flush=True)
            results.sort(key=lambda r: r[0])
            best_t, best = results[0]
            entry = dict(best.__dict__, us=round(best_t * 1e6, 1))
            cuda = best_cuda(qw, m, dtype) if m <= WGMMA_TUNE_MAX_M and cuda_too else None
            if cuda is not None:
                entry["cuda"] = cuda
            table.setdefault(str(m_bucket(m)), {})[f"{n}x{k}"] = entry
            if saved is not None:
                saved()
            top = ", ".join(f"{t * 1e6:.1f}us {c.block_m}x{c.block_n}x{c.block_k}s{c.split_k}w{c.num_warps}"
                            f"st{c.num_stages}{'' if c.use_dot else 'r'}{'D' if c.dequant_first else ''}"
                            f"{'S' if c.swap_ab else ''}" for t, c in results[:4])
            t_dense = cublas_seconds(n, k, m, dtype)
            cuda_note = f" | cuda {cuda} ({t_dense / cuda['us'] * 1e6:.2f}x)" if cuda else ""
            print(f"M={m:<5} {name:9} {fmt.name} {str(dtype)[6:]} cuBLAS {t_dense * 1e6:.1f}us "
                  f"({t_dense / best_t:.2f}x) | {top}{cuda_note}", flush=True)
            del qw
            torch.cuda.empty_cache()
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="all")
    parser.add_argument("--ms", default=",".join(map(str, MS)))
    parser.add_argument("--formats", default="e3m2", help="comma-separated formats, one table each (default e3m2)")
    parser.add_argument("--dtypes", default="fp16", help="comma-separated activation dtypes: fp16, bf16")
    parser.add_argument("--out", default=str(CONFIG_DIR))
    parser.add_argument("--no-cuda", action="store_true", help="time the Triton kernel alone")
    parser.add_argument("--cuda-only", action="store_true",
                        help="keep the file's Triton entries (implies --merge) and time the CUDA kernels alone")
    parser.add_argument("--wgmma-only", action="store_true",
                        help="with --cuda-only: time the wgmma kernel alone, keep the faster of it and the entry's")
    parser.add_argument("--merge", action="store_true",
                        help="keep the file's other tables and, in the tuned ones, the other M buckets")
    args = parser.parse_args(argv)
    path = Path(args.out) / f"{device_key('cuda')}.json"
    tables = {"/".join(key): configs for key, configs in tables_in(path).items()} if args.merge or args.cuda_only \
        or args.wgmma_only else {}
    ms = [int(v) for v in args.ms.split(",")]
    path.parent.mkdir(parents=True, exist_ok=True)

    def save():  # the whole file, replaced in one rename: a run killed mid-write leaves the last complete one
        part = path.with_suffix(".json.part")
        part.write_text(json.dumps({"device": torch.cuda.get_device_name(), "tables": tables}, indent=1))
        part.replace(path)

    for fmt in (FPFormat.parse(f) for f in args.formats.split(",")):
        for dtype_name in args.dtypes.split(","):
            dtype = DTYPES[dtype_name]
            key = f"{fmt.name}/{str(dtype)[6:]}"
            tables[key] = tables.get(key, {})  # tune_table fills this dict in place; save() writes it as it grows
            tune_table(fmt, dtype, ms, args.shapes, tables[key], not args.no_cuda, args.cuda_only or args.wgmma_only,
                       args.wgmma_only, save)
    save()
    print(f"wrote {path}")
    print("\n".join(compiled_report()))
    if WRONG:
        print(f"{len(WRONG)} launches gave wrong sums (kept out of the table):")
        for wrong in WRONG:
            print("  WRONG", *wrong)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
