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

import math
import os

import torch
import triton
import triton.language as tl

from ..formats import FPFormat
from ..packing import K_ALIGN, plane_shifts, plane_widths
from .dispatch import MIN_GROUP_BLOCK_K, KernelConfig, choose_config

FP16_MAN_BITS = 10
FP16_EXP_BIAS = 15
MAX_KERNEL_EXP_BITS = 4  # FP16 exponent field 0..15 stays finite; 5+ bits would reach FP16's Inf/NaN codes
PLANE_K_ALIGN = tl.constexpr(K_ALIGN)  # planes' rows are padded to this many columns
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
# Naming the halves with inline PTX (FP6LLM_PTX_SPLIT=1) measured 0-8% slower on the H100 than the portable
# shift/truncate form (2026-11-25, docs/kernel-notes.md), so the portable form is the default; PTX never runs
# in the interpreter.
SPLIT_WITH_PTX = tl.constexpr(not INTERPRETER and os.environ.get("FP6LLM_PTX_SPLIT") == "1")
# How a plane field reaches its FP16 bit position: 0 = shift the slot down, then shift into place (two shifts per
# field); 1 = one rotate per field in portable Triton (shift, shift, or); 2 = one rotate as inline PTX shf.l.wrap.
# Measured on an H200 (2026-11-30, bench/results/place-ab-h200-2026-11-30.md; llama-2-70b shapes, M = 1/8/64):
# 2 is fastest (M = 1: 0.85-0.90x the time of 1 and 0.94-0.95x of 0), so 2 is the default on the GPU. The
# interpreter runs no PTX: there 2 runs the same rotate as 1. FP6LLM_PLACE=0/1 selects the others for A/B runs.
_PLACE_REQUEST = os.environ.get("FP6LLM_PLACE", "2")
if _PLACE_REQUEST not in ("0", "1", "2"):
    raise ValueError(f"FP6LLM_PLACE={_PLACE_REQUEST!r}: expected 0 (two shifts), 1 (portable rotate) or 2 (PTX rotate)")
PLACE_MODE = tl.constexpr(1 if INTERPRETER and _PLACE_REQUEST == "2" else int(_PLACE_REQUEST))


@triton.jit
def _load_words(plane_ptr, row_stride, offs_n, n_mask, k0, k_padded, WIDTH: tl.constexpr, BLOCK_K: tl.constexpr,
                EVEN_K: tl.constexpr):
    """int32 [BLOCK_N, BLOCK_K * WIDTH / 32]: this tile's words of one plane."""
    offs_w = k0 * WIDTH // 32 + tl.arange(0, BLOCK_K * WIDTH // 32)
    mask = n_mask[:, None]
    if not EVEN_K:  # the last K block may run past the row's padded end
        mask = mask & (offs_w[None, :] < k_padded * WIDTH // 32)
    return tl.load(plane_ptr + offs_n[:, None] * row_stride + offs_w[None, :], mask=mask, other=0)


@triton.jit
def _place(words, WIDTH: tl.constexpr, FIELD_LSB: tl.constexpr, FIELD_BITS: tl.constexpr, TARGET: tl.constexpr,
           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 [BLOCK_N, BLOCK_K // 2]: bits FIELD_LSB .. +FIELD_BITS of the fields of columns (k0 + 2i, k0 + 2i + 1)
    moved to bit TARGET of the low / high 16-bit half, every other bit zero."""
    SLOTS: tl.constexpr = 16 // WIDTH
    PAIR_MASK: tl.constexpr = (((1 << FIELD_BITS) - 1) << TARGET) * 0x10001 - (1 << 32 if TARGET + FIELD_BITS > 15
                                                                              else 0)
    offsets = tl.arange(0, SLOTS) * WIDTH + FIELD_LSB  # where slot s's field bits sit in each half
    x = words.to(tl.uint32, bitcast=True)[:, :, None]
    if PLACE_MODE == 0:  # down to bit 0, then up to TARGET
        placed = ((x >> offsets[None, None, :]) << TARGET).to(tl.int32, bitcast=True)
    else:  # one rotate: the low half's field lands at TARGET, the high half's at 16 + TARGET
        rotate = ((TARGET - offsets) & 31)[None, None, :]
        if PLACE_MODE == 2:
            placed = tl.inline_asm_elementwise("shf.l.wrap.b32 $0, $1, $1, $2;", "=r,r,r",
                                               [x, rotate.to(tl.uint32) + tl.zeros_like(x)], dtype=tl.uint32,
                                               is_pure=True, pack=1).to(tl.int32, bitcast=True)
        else:
            placed = ((x << rotate) | (x >> ((32 - rotate) & 31))).to(tl.int32, bitcast=True)
    return tl.reshape(placed & PAIR_MASK, (BLOCK_N, BLOCK_K // 2))


@triton.jit
def _dequant_tile(p0_ptr, p1_ptr, p2_ptr, s0, s1, s2, offs_n, n_mask, k0, k_padded,
                  MAN_BITS: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
                  SH0: tl.constexpr, SH1: tl.constexpr, SH2: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """FP16 [BLOCK_N, BLOCK_K] tile = value(code) * 2^(bias - 15), from up to three planes (width 0 = absent).

    Plane p holds code bits SHp .. SHp + Wp - 1; plane 0 holds the sign in its top bit. The sign goes to FP16
    bit 15, code bit 0 to FP16 bit 10 - MAN_BITS, two weights per 32-bit operation.
    """
    CODE_BIT0: tl.constexpr = 10 - MAN_BITS  # FP16 bit where the code's bit 0 lands
    w0 = _load_words(p0_ptr, s0, offs_n, n_mask, k0, k_padded, W0, BLOCK_K, EVEN_K)
    bits = _place(w0, W0, W0 - 1, 1, 15, BLOCK_N, BLOCK_K)
    bits |= _place(w0, W0, 0, W0 - 1, SH0 + CODE_BIT0, BLOCK_N, BLOCK_K)
    if W1 > 0:
        w1 = _load_words(p1_ptr, s1, offs_n, n_mask, k0, k_padded, W1, BLOCK_K, EVEN_K)
        bits |= _place(w1, W1, 0, W1, SH1 + CODE_BIT0, BLOCK_N, BLOCK_K)
    if W2 > 0:
        w2 = _load_words(p2_ptr, s2, offs_n, n_mask, k0, k_padded, W2, BLOCK_K, EVEN_K)
        bits |= _place(w2, W2, 0, W2, SH2 + CODE_BIT0, BLOCK_N, BLOCK_K)
    if SPLIT_WITH_PTX:  # the register already is an fp16x2 pair: name its halves, no instructions
        lo, hi = tl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [bits],
                                           dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
    else:
        lo = (bits & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        hi = (bits >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    return tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))


@triton.jit
def fpx_gemm_kernel(
    x_ptr, p0_ptr, p1_ptr, p2_ptr, scale_ptr, bias_ptr, out_ptr, ws_ptr, count_ptr,
    M, N, K, stride_xm, stride_om, s0, s1, s2, stride_scale_n, scale_factor,
    MAN_BITS: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
    SH0: tl.constexpr, SH1: tl.constexpr, SH2: tl.constexpr,
    GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr, EVEN_K: tl.constexpr, DOT_FP32: tl.constexpr, SWAP_AB: tl.constexpr,
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

    k_padded = tl.cdiv(K, PLANE_K_ALIGN) * PLANE_K_ALIGN
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
        w = _dequant_tile(p0_ptr, p1_ptr, p2_ptr, s0, s1, s2, offs_n, n_mask, k0, k_padded, MAN_BITS,
                          W0, W1, W2, SH0, SH1, SH2, BLOCK_N, BLOCK_K, EVEN_K).to(x.dtype)
        if DOT_FP32:  # Triton 3.6's interpreter gets bf16 tl.dot wrong; fp32 operands hold bf16 values exactly
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        if SWAP_AB:
            part = tl.dot(w, tl.trans(x))
        elif USE_DOT:
            part = tl.dot(x, tl.trans(w))
        else:  # BLOCK_M == 1: a dot of one row is a multiply and a reduction over K
            part = tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=1)[None, :]
        if GROUP_SIZE > 0:  # BLOCK_K divides GROUP_SIZE: one scale per channel for this K block
            group_scale = tl.load(scale_ptr + offs_n * stride_scale_n + k0 // GROUP_SIZE, mask=n_mask, other=0.0)
            if SWAP_AB:
                acc += part * group_scale.to(tl.float32)[:, None]
            else:
                acc += part * group_scale.to(tl.float32)[None, :]
        else:
            acc += part
    if SWAP_AB:
        acc = tl.trans(acc)

    if GROUP_SIZE > 0:
        acc = acc * scale_factor
    else:
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
    p0_ptr, p1_ptr, p2_ptr, scale_ptr, out_ptr, N, K, s0, s1, s2, stride_scale_n, scale_factor,
    MAN_BITS: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
    SH0: tl.constexpr, SH1: tl.constexpr, SH2: tl.constexpr, GROUP_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    """out [N, K] = decode(codes) * scale in out's dtype: the large-M path feeds it to cuBLAS."""
    pid_n = tl.program_id(0)
    k0 = tl.program_id(1) * BLOCK_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    k_padded = tl.cdiv(K, PLANE_K_ALIGN) * PLANE_K_ALIGN
    w = _dequant_tile(p0_ptr, p1_ptr, p2_ptr, s0, s1, s2, offs_n, n_mask, k0, k_padded, MAN_BITS,
                      W0, W1, W2, SH0, SH1, SH2, BLOCK_N, BLOCK_K, EVEN_K).to(tl.float32)
    if GROUP_SIZE > 0:
        scale = tl.load(scale_ptr + offs_n * stride_scale_n + k0 // GROUP_SIZE, mask=n_mask, other=0.0)
    else:
        scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)
    w = w * (scale.to(tl.float32) * scale_factor)[:, None]
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty),
             mask=n_mask[:, None] & (offs_k[None, :] < K))


# ---------------------------------------------------------------------------------------------------------------
# Launch wrappers


class _SplitKScratch:
    """Per-device float32 workspace for split-K partials and int32 arrival counters (kept at zero between launches).

    Grown, never shrunk; allocate it before CUDA-graph capture by running the layer once (any warm-up does).
    """

    def __init__(self):
        self.buffers = {}

    def get(self, device, ws_elems: int, tiles: int):
        ws, counts = self.buffers.get(device, (None, None))
        if ws is None or ws.numel() < ws_elems:
            ws = torch.empty(max(ws_elems, 1 << 20), dtype=torch.float32, device=device)
        if counts is None or counts.numel() < tiles:
            counts = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        self.buffers[device] = (ws, counts)
        return ws, counts


SCRATCH = _SplitKScratch()


def kernel_supports(fmt: FPFormat, group_size: "int | None", x_dtype: torch.dtype) -> bool:
    """Whether fpx_gemm handles this case (else callers use the de-quantize + matmul path)."""
    return (fmt.exp_bits <= MAX_KERNEL_EXP_BITS and x_dtype in (torch.float16, torch.bfloat16)
            and (group_size is None or group_size % MIN_GROUP_BLOCK_K == 0))


def _plane_args(planes, fmt: FPFormat):
    """Three plane tensors (unused ones repeat plane 0), their widths (0 = absent) and code-bit shifts."""
    widths, shifts = plane_widths(fmt.bits), plane_shifts(fmt.bits)
    missing = 3 - len(planes)
    return list(planes) + [planes[0]] * missing, list(widths) + [0] * missing, list(shifts) + [0] * missing


def dequantize_planes(planes, scales: torch.Tensor, fmt: FPFormat, n: int, k: int, group_size: "int | None",
                      dtype: torch.dtype, config: "KernelConfig | None" = None) -> torch.Tensor:
    """The weight [N, K] in ``dtype`` (float16/bfloat16/float32), de-quantized on the GPU in one pass."""
    block_n, block_k = (64, 128) if config is None else (config.block_n, config.block_k)
    if group_size:
        block_k = math.gcd(block_k, group_size)
    padded, w, sh = _plane_args(planes, fmt)
    out = torch.empty(n, k, dtype=dtype, device=scales.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    dequantize_kernel[grid](
        padded[0], padded[1], padded[2], scales, out, n, k, padded[0].stride(0), padded[1].stride(0),
        padded[2].stride(0), scales.stride(0), 2.0 ** (FP16_EXP_BIAS - fmt.bias),
        MAN_BITS=fmt.man_bits, W0=w[0], W1=w[1], W2=w[2], SH0=sh[0], SH1=sh[1], SH2=sh[2],
        GROUP_SIZE=group_size or 0, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
    )
    return out


def fpx_gemm(x: torch.Tensor, planes, scales: torch.Tensor, bias, fmt: FPFormat, n: int, k: int,
             group_size: "int | None", config: "KernelConfig | None" = None) -> torch.Tensor:
    """out [M, N] = x [M, K] @ W.T (+ bias) in x's dtype. x float16/bfloat16 with unit column stride.

    ``config`` overrides the dispatch table (tests use it to cover every path). Raises ValueError for a case
    that kernel_supports rejects.
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
    padded, w, sh = _plane_args(planes, fmt)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    ws, counts = SCRATCH.get(x.device, tiles * config.split_k * config.block_m * config.block_n, tiles) \
        if config.split_k > 1 else (out, out)
    grid = (tiles * config.split_k,)
    fpx_gemm_kernel[grid](
        x, padded[0], padded[1], padded[2], scales, bias if bias is not None else scales, out, ws, counts,
        m, n, k, x.stride(0), out.stride(0), padded[0].stride(0), padded[1].stride(0), padded[2].stride(0),
        scales.stride(0), 2.0 ** (FP16_EXP_BIAS - fmt.bias),
        MAN_BITS=fmt.man_bits, W0=w[0], W1=w[1], W2=w[2], SH0=sh[0], SH1=sh[1], SH2=sh[2],
        GROUP_SIZE=group_size or 0, HAS_BIAS=bias is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=config.split_k,
        USE_DOT=config.use_dot, EVEN_K=k % config.block_k == 0,
        DOT_FP32=config.use_dot and x.dtype == torch.bfloat16 and INTERPRETER, SWAP_AB=config.swap_ab,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
