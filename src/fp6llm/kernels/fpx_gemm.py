"""TC-FPx: fused de-quantize + tensor-core matmul for pre-packed FPx weights, one Triton source for every format.

    out[M, N] = x[M, K] @ (decode(codes) * scale)[N, K].T (+ bias)

x: float16 or bfloat16 [M, K] (row stride free, unit column stride); weight: the bit planes of packing.py
(layout v1, docs/layout.md) and float32/float16 scales [N] or [N, K / GROUP_SIZE]; out: x's dtype [M, N].

De-quantization works on two weights per 32-bit integer operation: one shift and mask of a plane word put the
fields of columns (k, k + 1) into the two 16-bit halves of a register; a few more shifts place the code's sign at
FP16 bit 15 and its exponent/mantissa bits right under the FP16 exponent's low end, which makes the FP16 number
value(code) * 2^(bias - 15) exactly (subnormals included), for formats with at most 4 exponent bits. The factor
2^(15 - bias) is folded into the scale, applied once per output in the epilogue (per K block for group scales).
BF16 activations convert those FP16 weights to BF16 (exact) before the dot.

Small M is bound by weight bytes: the grid has one program per BLOCK_N output channels (and per BLOCK_M rows),
and SPLIT_K programs share one tile's K range, the last one to finish summing the others' float32 partials from a
workspace (a per-tile arrival counter, reset by that last program, so no extra launch and CUDA-graph safe).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..formats import FPFormat
from ..packing import TILE_K, placement, signed32
from .dispatch import MIN_BLOCK_K, SMALL_GROUPS, KernelConfig, choose_config
from .workspace import CONSTANTS, WORKSPACE

FP16_EXP_BIAS = 15
MAX_KERNEL_EXP_BITS = 4  # FP16 exponent field 0..15 stays finite; 5+ bits would reach FP16's Inf/NaN codes
MAX_PLANES = 3
MAX_EXTRACTS = 2  # per plane: one rotate + mask per slot when its fields move together, else one per field
ROTATION_STRIDE = tl.constexpr(MAX_EXTRACTS)
PLANE_TILE_K = tl.constexpr(TILE_K)  # columns of one packed tile (packing.TILE_K)  # the rotation table is [plane][slot (16)][extract]
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
# Rotates run as one PTX funnel shift (shf.l.wrap) on the GPU: 0.85x the time of the portable shl/shr/or and 0.95x of
# two plain shifts on H200 70B shapes (2026-11-30, docs/kernel-notes.md). The interpreter runs no PTX: there the
# portable form computes the same rotate.
ROTATE_WITH_PTX = tl.constexpr(not INTERPRETER)
# Field moves as 32 x 32 -> 64-bit multiplies by 2^r (IMAD.WIDE, FMA pipe) instead of funnel shifts (SHF, ALU pipe):
# sm_90a, e3m2, FP16 (bench/sass.py, 2026-12-02): M = 1 config 2.53 -> 2.09 ALU and 1.11 -> 2.14 FMA lane-operations
# per weight, 4.62 -> 5.22 issued; M = 128 3.61 -> 2.91 ALU, 4.95 -> 5.25 issued. Fewer ALU operations, more in
# all: off until the device run times both (bench/kernel_v2.py --imad-rotate).
ROTATE_BY_MULTIPLY = False


@triton.jit
def _rotl(x, r):
    """uint32 x rotated left by r (0..31, a tensor broadcast against x)."""
    if ROTATE_WITH_PTX:
        return tl.inline_asm_elementwise("shf.l.wrap.b32 $0, $1, $1, $2;", "=r,r,r", [x, r.to(tl.uint32) + tl.zeros_like(x)],
                                         dtype=tl.uint32, is_pure=True, pack=1)
    return (x << r) | (x >> ((32 - r) & 31))


@triton.jit
def _rotl_imad(x, power):
    """uint32 x rotated left by r, given power = 2^r (uint32 bits of an int32 tensor broadcast against x): the low |
    high word of one 32 x 32 -> 64-bit multiply, which issues on the FMA pipe (IMAD.WIDE) where shf.l.wrap takes
    the ALU pipe."""
    power = power.to(tl.uint32, bitcast=True) + tl.zeros_like(x)
    if ROTATE_WITH_PTX:
        return tl.inline_asm_elementwise(
            "{ .reg .b64 w; .reg .b32 lo, hi; mul.wide.u32 w, $1, $2; mov.b64 {lo, hi}, w; or.b32 $0, lo, hi; }",
            "=r,r,r", [x, power], dtype=tl.uint32, is_pure=True, pack=1)
    return (x * power) | tl.umulhi(x, power)


@triton.jit
def _move(x, rotation, IMAD_ROTATE: tl.constexpr):
    """x rotated by a table entry: r (a funnel shift) or, with IMAD_ROTATE, 2^r (a multiply)."""
    if IMAD_ROTATE:
        return _rotl_imad(x, rotation)
    return _rotl(x, rotation)


@triton.jit
def _plane_pairs(plane_ptr, rot_ptr, n0, N, kt0, k_tiles,
                 PLANE: tl.constexpr, W: tl.constexpr, NX: tl.constexpr, MASK0: tl.constexpr, MASK1: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, IMAD_ROTATE: tl.constexpr):
    """int32 [BLOCK_N, BLOCK_K // 2]: one plane's bits of each weight pair (k, k + 1) of the block, already at their
    FP16 positions (layout version 2, packing.py): rows n0 .. n0 + BLOCK_N - 1 (n0 a multiple of 16), K tiles
    kt0 .. kt0 + BLOCK_K / 128 - 1.

    The block's words are read as they lie (each 16-row tile's K tiles are one contiguous run: wide loads), decoded in
    lane order (lane 4 g + t, word j, slot s: pair q = j * S + s), then permuted to (row, pair) order:
    q = 4 ks + 2 rh + rl is row 8 rl + g, columns 32 t + 4 ks + 2 rh + (0, 1).
    """
    KT: tl.constexpr = BLOCK_K // PLANE_TILE_K
    BN16: tl.constexpr = BLOCK_N // 16
    WORDS: tl.constexpr = 2 * W  # per lane per tile
    GROUP: tl.constexpr = 4 if WORDS > 4 else WORDS  # a lane's words are stored in groups of this many
    SLOTS: tl.constexpr = 16 // W
    TILE_WORDS: tl.constexpr = 64 * W
    row_tiles = n0 // 16 + tl.arange(0, BN16)
    tile_mask = row_tiles * 16 < N
    i = tl.arange(0, KT * TILE_WORDS)
    mask = tile_mask[:, None]
    if not EVEN_K:  # the last K block may run past the padded K
        mask = mask & ((kt0 + i // TILE_WORDS) < k_tiles)[None, :]
    words = tl.load(plane_ptr + (row_tiles * k_tiles + kt0)[:, None] * TILE_WORDS + i[None, :], mask=mask, other=0)
    # [BN16, KT, WORDS / GROUP, 32 lanes, GROUP] -> lane-major [BN16, KT, 32, WORDS]
    words = tl.reshape(words, (BN16, KT, WORDS // GROUP, 32, GROUP))
    words = tl.reshape(tl.permute(words, (0, 1, 3, 2, 4)), (BN16, KT, 32, WORDS))
    x = words.to(tl.uint32, bitcast=True)[:, :, :, :, None]
    slot = tl.arange(0, SLOTS)
    # the table holds each slot's rotations r, or 2^r with IMAD_ROTATE (_rotation_table)
    rot = tl.load(rot_ptr + (PLANE * 16 + slot) * ROTATION_STRIDE)[None, None, None, None, :]
    pairs = _move(x, rot, IMAD_ROTATE).to(tl.int32, bitcast=True) & MASK0  # int32 masks: a sign bit is negative
    if NX > 1:
        rot1 = tl.load(rot_ptr + (PLANE * 16 + slot) * ROTATION_STRIDE + 1)[None, None, None, None, :]
        pairs |= _move(x, rot1, IMAD_ROTATE).to(tl.int32, bitcast=True) & MASK1
    # q = j * SLOTS + s = 4 ks + 2 rh + rl; lane = 4 g + t  ->  [BN16, rl, g, KT, t, ks, rh]
    pairs = tl.reshape(pairs, (BN16, KT, 8, 4, 8, 2, 2))
    pairs = tl.permute(pairs, (0, 6, 2, 1, 3, 4, 5))
    return tl.reshape(pairs, (BLOCK_N, BLOCK_K // 2))


@triton.jit
def _dequant_tile(p0_ptr, p1_ptr, p2_ptr, rot_ptr, n0, N, kt0, k_tiles,
                  W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
                  NX0: tl.constexpr, NX1: tl.constexpr, NX2: tl.constexpr,
                  M00: tl.constexpr, M01: tl.constexpr, M10: tl.constexpr, M11: tl.constexpr,
                  M20: tl.constexpr, M21: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, IMAD_ROTATE: tl.constexpr):
    """FP16 [BLOCK_N, BLOCK_K] tile = value(code) * 2^(bias - 15), from up to three planes (width 0 = absent):
    the OR of the planes' placed bits is each pair's fp16x2 register (two weights per 32-bit operation)."""
    bits = _plane_pairs(p0_ptr, rot_ptr, n0, N, kt0, k_tiles, 0, W0, NX0, M00, M01, BLOCK_N, BLOCK_K, EVEN_K,
                        IMAD_ROTATE)
    if W1 > 0:
        bits |= _plane_pairs(p1_ptr, rot_ptr, n0, N, kt0, k_tiles, 1, W1, NX1, M10, M11, BLOCK_N, BLOCK_K,
                             EVEN_K, IMAD_ROTATE)
    if W2 > 0:
        bits |= _plane_pairs(p2_ptr, rot_ptr, n0, N, kt0, k_tiles, 2, W2, NX2, M20, M21, BLOCK_N, BLOCK_K,
                             EVEN_K, IMAD_ROTATE)
    lo = (bits & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    hi = (bits >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    return tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))


@triton.jit
def fpx_gemm_kernel(
    x_ptr, p0_ptr, p1_ptr, p2_ptr, rot_ptr, scale_ptr, bias_ptr, out_ptr, ws_ptr, count_ptr,
    M, N, K, stride_xm, stride_om, stride_scale_n, scale_factor,
    W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, NX0: tl.constexpr, NX1: tl.constexpr, NX2: tl.constexpr,
    M00: tl.constexpr, M01: tl.constexpr, M10: tl.constexpr, M11: tl.constexpr, M20: tl.constexpr, M21: tl.constexpr,
    GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr, EVEN_K: tl.constexpr, DOT_FP32: tl.constexpr, SWAP_AB: tl.constexpr,
    IMAD_ROTATE: tl.constexpr,
):
    """One program: rows [BLOCK_M], channels [BLOCK_N], its 1/SPLIT_K share of K (in BLOCK_K steps)."""
    pid = tl.program_id(0)
    pid_k = pid % SPLIT_K
    tile = pid // SPLIT_K
    num_n = tl.cdiv(N, BLOCK_N)
    pid_n = tile % num_n  # channels fastest: programs running together share x rows in L2
    pid_m = tile // num_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N

    k_tiles = tl.cdiv(K, PLANE_TILE_K)
    k_blocks = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_blocks, SPLIT_K)
    kb_start = pid_k * per_split
    kb_end = tl.minimum(kb_start + per_split, k_blocks)

    if SWAP_AB:  # out.T = W @ x.T: the de-quantized weight is the A operand (wgmma reads A from registers)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb_start, kb_end):
        k0 = kb * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_mask = m_mask[:, None]
        if not EVEN_K:
            x_mask = x_mask & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=x_mask, other=0.0)
        w = _dequant_tile(p0_ptr, p1_ptr, p2_ptr, rot_ptr, pid_n * BLOCK_N, N, k0 // PLANE_TILE_K, k_tiles, W0, W1, W2,
                          NX0, NX1, NX2, M00, M01, M10, M11, M20, M21, BLOCK_N, BLOCK_K, EVEN_K, IMAD_ROTATE)
        if GROUP_SIZE > 0 and GROUP_SIZE < BLOCK_K:  # several groups per block: scale the weights themselves
            groups = tl.load(scale_ptr + offs_n[:, None] * stride_scale_n + k0 // GROUP_SIZE
                             + tl.arange(0, BLOCK_K // GROUP_SIZE)[None, :], mask=n_mask[:, None], other=0.0)
            w = tl.reshape(tl.reshape(w.to(tl.float32), (BLOCK_N, BLOCK_K // GROUP_SIZE, GROUP_SIZE))
                           * (groups.to(tl.float32) * scale_factor)[:, :, None], (BLOCK_N, BLOCK_K))
        w = w.to(x.dtype)
        if DOT_FP32:  # Triton 3.6's interpreter gets bf16 tl.dot wrong; fp32 operands hold bf16 values exactly
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        if SWAP_AB:
            part = tl.dot(w, tl.trans(x))
        elif USE_DOT:
            part = tl.dot(x, tl.trans(w))
        else:  # BLOCK_M == 1: a dot of one row is a multiply and a reduction over K
            part = tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=1)[None, :]
        if GROUP_SIZE >= BLOCK_K:  # BLOCK_K divides GROUP_SIZE: one scale per channel for this K block
            group_scale = tl.load(scale_ptr + offs_n * stride_scale_n + k0 // GROUP_SIZE, mask=n_mask, other=0.0)
            if SWAP_AB:
                acc += part * group_scale.to(tl.float32)[:, None]
            else:
                acc += part * group_scale.to(tl.float32)[None, :]
        else:
            acc += part
    if SWAP_AB:
        acc = tl.trans(acc)

    if GROUP_SIZE >= BLOCK_K:
        acc = acc * scale_factor
    elif GROUP_SIZE == 0:
        channel_scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc = acc * (channel_scale * scale_factor)[None, :]

    if SPLIT_K > 1:
        # Serial split-K: publish this partial, count arrivals; the last arrival sums all partials.
        tile_ws = ws_ptr + tile * SPLIT_K * BLOCK_M * BLOCK_N
        local = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tl.store(tile_ws + pid_k * BLOCK_M * BLOCK_N + local, acc)
        arrived = tl.atomic_add(count_ptr + tile, 1)  # acq_rel: our store is visible before the count
        if arrived == SPLIT_K - 1:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for split in range(0, SPLIT_K):
                acc += tl.load(tile_ws + split * BLOCK_M * BLOCK_N + local, cache_modifier=".cg")
            tl.atomic_xchg(count_ptr + tile, 0)  # ready for the next launch (or graph replay)
            _epilogue(acc, bias_ptr, out_ptr, stride_om, offs_m, offs_n, m_mask, n_mask, HAS_BIAS)
    else:
        _epilogue(acc, bias_ptr, out_ptr, stride_om, offs_m, offs_n, m_mask, n_mask, HAS_BIAS)


@triton.jit
def _epilogue(acc, bias_ptr, out_ptr, stride_om, offs_m, offs_n, m_mask, n_mask, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def dequantize_kernel(
    p0_ptr, p1_ptr, p2_ptr, rot_ptr, scale_ptr, out_ptr, N, K, stride_scale_n, scale_factor,
    W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, NX0: tl.constexpr, NX1: tl.constexpr, NX2: tl.constexpr,
    M00: tl.constexpr, M01: tl.constexpr, M10: tl.constexpr, M11: tl.constexpr, M20: tl.constexpr, M21: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    """out [N, K] = decode(codes) * scale in out's dtype: the large-M path feeds it to cuBLAS."""
    pid_n = tl.program_id(0)
    k0 = tl.program_id(1) * BLOCK_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    w = _dequant_tile(p0_ptr, p1_ptr, p2_ptr, rot_ptr, pid_n * BLOCK_N, N, k0 // PLANE_TILE_K,
                      tl.cdiv(K, PLANE_TILE_K), W0, W1, W2, NX0, NX1, NX2, M00, M01, M10, M11, M20, M21,
                      BLOCK_N, BLOCK_K, EVEN_K, False).to(tl.float32)
    if GROUP_SIZE > 0:  # a scale per element's group (BLOCK_K need not divide the group size, nor the reverse)
        scale = tl.load(scale_ptr + offs_n[:, None] * stride_scale_n + offs_k[None, :] // GROUP_SIZE,
                        mask=n_mask[:, None] & (offs_k[None, :] < K), other=0.0)
        w = w * (scale.to(tl.float32) * scale_factor)
    else:
        scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)
        w = w * (scale.to(tl.float32) * scale_factor)[:, None]
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty),
             mask=n_mask[:, None] & (offs_k[None, :] < K))


# ---------------------------------------------------------------------------------------------------------------
# Launch wrappers


def kernel_supports(fmt: FPFormat, group_size: "int | None", x_dtype: torch.dtype) -> bool:
    """Whether fpx_gemm handles this case (else callers use the de-quantize + matmul path)."""
    return (fmt.exp_bits <= MAX_KERNEL_EXP_BITS and x_dtype in (torch.float16, torch.bfloat16)
            and (group_size is None or group_size in SMALL_GROUPS or group_size % MIN_BLOCK_K == 0))


@functools.lru_cache(maxsize=None)
def _placement_consts(fmt: FPFormat) -> tuple:
    """(widths, extracts per plane, int32 masks [plane][extract], rotation table [3, 16, 2] as a list) of fmt's
    layout-2 placement; absent planes have width 0."""
    widths, extracts, masks = [0] * MAX_PLANES, [1] * MAX_PLANES, [[0, 0] for _ in range(MAX_PLANES)]
    table = [[[0, 0] for _ in range(16)] for _ in range(MAX_PLANES)]
    for p, plane in enumerate(placement(fmt)):
        widths[p] = plane.width
        if plane.tied:  # one rotate moves every field of a slot: one mask for all of them
            masks[p][0] = signed32(plane.mask)
            for slot, rotations in enumerate(plane.rotations):
                table[p][slot][0] = rotations[0]
        else:
            extracts[p] = len(plane.fields)
            for f, field in enumerate(plane.fields):
                masks[p][f] = signed32(field.mask)
            for slot, rotations in enumerate(plane.rotations):
                table[p][slot][:len(rotations)] = list(rotations)
    return tuple(widths), tuple(extracts), tuple(tuple(m) for m in masks), table


def _rotation_table(fmt: FPFormat, device, powers: bool = False) -> torch.Tensor:
    """int32 [3 * 16 * 2] rotation table of fmt on device: the rotations r, or with ``powers`` 2^r as int32 bits
    (the IMAD_ROTATE kernels). Made once per format and device, before any capture."""
    if powers:
        return CONSTANTS.get(("powers", fmt), device, lambda: [
            [[signed32(1 << r) for r in slot] for slot in plane] for plane in _placement_consts(fmt)[3]])
    return CONSTANTS.get(("rotations", fmt), device, lambda: _placement_consts(fmt)[3])


@functools.lru_cache(maxsize=None)
def _plane_kwargs(fmt: FPFormat) -> dict:
    """The kernels' per-plane constexprs of fmt (one dict per format: callers unpack it, never change it)."""
    widths, extracts, masks, _ = _placement_consts(fmt)
    kwargs = {f"W{p}": widths[p] for p in range(MAX_PLANES)}
    kwargs.update({f"NX{p}": extracts[p] for p in range(MAX_PLANES)})
    kwargs.update({f"M{p}{f}": masks[p][f] for p in range(MAX_PLANES) for f in range(MAX_EXTRACTS)})
    return kwargs


def _padded_planes(planes) -> list:
    return list(planes) + [planes[0]] * (MAX_PLANES - len(planes))


def dequantize_planes(planes, scales: torch.Tensor, fmt: FPFormat, n: int, k: int, group_size: "int | None",
                      dtype: torch.dtype, config: "KernelConfig | None" = None) -> torch.Tensor:
    """The weight [N, K] in ``dtype`` (float16/bfloat16/float32), de-quantized on the GPU in one pass."""
    block_n, block_k = (64, 128) if config is None else (config.block_n, config.block_k)
    padded = _padded_planes(planes)
    out = torch.empty(n, k, dtype=dtype, device=scales.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    dequantize_kernel[grid](
        padded[0], padded[1], padded[2], _rotation_table(fmt, scales.device), scales, out, n, k, scales.stride(0),
        2.0 ** (FP16_EXP_BIAS - fmt.bias), **_plane_kwargs(fmt),
        GROUP_SIZE=group_size or 0, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
    )
    return out


def fpx_gemm(x: torch.Tensor, planes, scales: torch.Tensor, bias, fmt: FPFormat, n: int, k: int,
             group_size: "int | None", config: "KernelConfig | None" = None,
             imad_rotate: bool = ROTATE_BY_MULTIPLY) -> torch.Tensor:
    """out [M, N] = x [M, K] @ W.T (+ bias) in x's dtype. x float16/bfloat16 with unit column stride.

    ``config`` overrides the dispatch table (tests use it to cover every path); ``imad_rotate`` moves fields with
    multiplies instead of funnel shifts (ROTATE_BY_MULTIPLY). Raises ValueError for a case that kernel_supports rejects.
    """
    if not kernel_supports(fmt, group_size, x.dtype):
        raise ValueError(f"fpx_gemm does not handle {fmt.name}, group_size={group_size}, x {x.dtype}")
    if x.dim() != 2 or x.shape[1] != k or x.stride(1) != 1:
        raise ValueError(f"x must be [M, {k}] with unit column stride, got {tuple(x.shape)} strides {x.stride()}")
    m = x.shape[0]
    if config is None:
        config = choose_config(m, n, k, fmt, x.dtype, group_size, x.device)
    if config.dequant_first:
        weight = dequantize_planes(planes, scales, fmt, n, k, group_size, x.dtype, config)
        return torch.nn.functional.linear(x, weight, bias)
    padded = _padded_planes(planes)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    ws, counts = WORKSPACE.reserve(x.device, tiles * config.split_k * config.block_m * config.block_n, tiles) \
        if config.split_k > 1 else (out, out)
    grid = (tiles * config.split_k,)
    fpx_gemm_kernel[grid](
        x, padded[0], padded[1], padded[2], _rotation_table(fmt, x.device, imad_rotate), scales,
        bias if bias is not None else scales, out, ws, counts, m, n, k, x.stride(0), out.stride(0), scales.stride(0),
        2.0 ** (FP16_EXP_BIAS - fmt.bias), **_plane_kwargs(fmt), GROUP_SIZE=group_size or 0, HAS_BIAS=bias is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=config.split_k,
        USE_DOT=config.use_dot, EVEN_K=k % config.block_k == 0,
        DOT_FP32=config.use_dot and x.dtype == torch.bfloat16 and INTERPRETER, SWAP_AB=config.swap_ab,
        IMAD_ROTATE=imad_rotate,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
