"""Machine-code counter: the main K loop's instruction mix and lane-operations per weight, per pipe, on sm_90a.

No GPU needed. Compiles the Triton kernel (triton.compile for GPUTarget("cuda", 90, 32)) and/or the CUDA small-M
kernel (NVRTC from PyTorch or the nvidia-cuda-nvrtc package; else nvcc if on PATH), disassembles the cubin with the
cuobjdump bundled in Triton's wheel, finds the innermost loop (the body of the backward branch with the most
instructions), classifies its instructions by the pipe they issue to, and divides lane-operations by the weights one
pass of the loop de-quantizes:

    lane-ops per weight = warp-instructions x 32 x warps per CTA / weights per CTA-iteration

    python3 bench/sass.py                     # both kernels, e3m2, fp16, the default small-M configuration
    python3 bench/sass.py --format e2m3 --dtype bfloat16 --kernel cuda
    python3 bench/sass.py --kernel mid --m 64 --row-tiles 1   # the mid-M kernel (cuda/fpx_mid_m.cu)

Budget at the H200's floor (docs/kernel-notes.md): ~22-25 weights per SM-clock, so ~2.6-2.9 ALU lane-ops per weight
(64 ALU lanes per SM-clock) and ~5.1-5.8 lane-ops per weight in all (128 issue lanes per SM-clock).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

PIPES = {
    "alu": {"LOP3", "LOP", "SHF", "IADD3", "IADD", "PRMT", "SEL", "ISETP", "LEA", "MOV", "IMNMX", "BMSK", "SGXT",
            "FSEL", "FSETP", "PLOP3", "P2R", "R2P", "VIADD", "VIMNMX", "IABS", "FLO", "POPC", "BREV", "CS2R", "S2R",
            "S2UR", "R2UR", "UMOV", "ULOP3", "UIADD3", "USHF", "ULEA", "UISETP", "USEL", "UIMAD", "UPRMT"},
    "fma": {"IMAD", "FFMA", "FADD", "FMUL", "HFMA2", "HADD2", "HMUL2", "FMNMX", "IDP", "I2FP", "F2IP"},
    "cvt": {"F2F", "F2FP", "I2F", "F2I", "FRND", "MUFU"},
    "mma": {"HMMA", "IMMA", "HGMMA", "QGMMA", "IGMMA", "BMMA", "DMMA", "WARPGROUP"},
    "lsu": {"LDG", "LDS", "LDSM", "STG", "STS", "LD", "ST", "ATOM", "ATOMS", "ATOMG", "RED", "LDGSTS", "LDGDEPBAR",
            "UBLKCP", "UTMALDG", "SYNCS", "SHFL", "STSM"},
}
CONTROL = {"BRA", "BAR", "EXIT", "NOP", "DEPBAR", "BSSY", "BSYNC", "WARPSYNC", "YIELD", "RET", "CALL", "MEMBAR",
           "ERRBAR", "CCTL", "FENCE", "ELECT", "VOTE", "VOTEU", "PREEXIT", "ACQBULK", "UCGABAR_ARV", "UCGABAR_WAIT"}
LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)([.\w]*)\s*(.*?);")


def cuobjdump() -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def _cuobjdump(cubin: bytes, option: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as file:
        file.write(cubin)
        path = file.name
    try:
        return subprocess.run([cuobjdump(), option, path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)


def disassemble(cubin: bytes) -> list[tuple[int, str, str, str]]:
    """(address, opcode, modifiers, operands) of every instruction."""
    return [(int(a, 16), op, mods, args) for a, op, mods, args in LINE.findall(_cuobjdump(cubin, "-sass"))]


def _written(op: str, mods: str, args: str) -> range:
    """The registers an instruction writes: its first operand when that is a register, widened by .WIDE / .64 /
    .128 (a store's first operand is an address, and writes none)."""
    found = re.match(r"R(\d+)\b", args)
    if found is None or op.startswith("ST") or op in ("RED", "HGMMA"):
        return range(0)
    width = 4 if ".128" in mods else 2 if (".64" in mods or ".WIDE" in mods) else 1
    return range(int(found.group(1)), int(found.group(1)) + width)


def wgmma_register_hazards(instructions) -> list:
    """Instructions that write an A register of an HGMMA still in flight (the tensor cores read A until a wait
    retires its group; ptxas does not always keep those registers, 2026-12-04). An HGMMA marked gsb0 closes a
    group (one commit); WARPGROUP.DEPBAR.LE gsb0, N retires all but the newest N groups. In program order, which
    the wgmma kernel's straight-line K loop body follows; pass a loop body twice to check across its back edge."""
    hazards, groups, current = [], [], set()
    for address, op, mods, args in instructions:
        if op == "HGMMA":
            found = re.match(r"R\d+, R(\d+),", args)
            if found:
                current.update(range(int(found.group(1)), int(found.group(1)) + 4))
            if "gsb0" in args:
                groups.append(current)
                current = set()
            continue
        if op == "WARPGROUP" and ".DEPBAR" in mods:
            keep = int(re.search(r"gsb0, (0x[0-9a-f]+|\d+)", args).group(1), 0)
            groups = groups[len(groups) - keep:] if keep else []
            continue
        in_flight = set().union(current, *groups)
        if in_flight and set(_written(op, mods, args)) & in_flight:
            hazards.append((address, op + mods, args))
    return hazards


def registers(cubin: bytes) -> int:
    """Registers per thread of the cubin's (first) kernel."""
    return int(re.search(r"REG:(\d+)", _cuobjdump(cubin, "--dump-resource-usage")).group(1))


def innermost_loop(instructions) -> list:
    """The instructions of the K loop: of the loop bodies (backward branches), the one with the most MMAs."""
    by_address = {a: i for i, (a, *_) in enumerate(instructions)}
    loops = []
    for i, (address, op, _, args) in enumerate(instructions):
        if op != "BRA":
            continue
        target = re.search(r"0x([0-9a-f]+)", args)
        if target is None or int(target.group(1), 16) >= address:
            continue
        start = by_address.get(int(target.group(1), 16))
        if start is not None:
            loops.append((start, i))
    if not loops:
        raise ValueError("no loop found in the kernel")
    # an out-of-line retry (a wait loop ptxas placed after the kernel's end, as it does for mbarrier waits) branches
    # back into the loop body: its span holds the EXIT, which the K loop's never does
    loops = [span for span in loops
             if not any(op == "EXIT" for _, op, _, _ in instructions[span[0]:span[1] + 1])] or loops

    def mma_count(span):
        return sum(op in PIPES["mma"] for _, op, _, _ in instructions[span[0]:span[1] + 1])

    # the K loop: the loop with the most MMA instructions, the tightest such one (no prologue or epilogue around it)
    start, end = max(loops, key=lambda span: (mma_count(span), -(span[1] - span[0])))
    return instructions[start:end + 1]


def pipe_of(op: str) -> str:
    for pipe, ops in PIPES.items():
        if op in ops:
            return pipe
    return "control" if op in CONTROL else "other"


def report(name: str, cubin: bytes, warps: int, weights_per_iteration: int) -> dict:
    """Print and return the per-pipe lane-operations per weight of the innermost loop."""
    loop = innermost_loop(disassemble(cubin))
    ops = collections.Counter(op for _, op, _, _ in loop)
    pipes = collections.Counter()
    for op, count in ops.items():
        pipes[pipe_of(op)] += count
    per_weight = {pipe: count * 32 * warps / weights_per_iteration for pipe, count in pipes.items()}
    issued = sum(v for pipe, v in per_weight.items() if pipe != "control")
    regs = registers(cubin)
    print(f"\n{name}: loop of {len(loop)} instructions per warp, {weights_per_iteration} weights per CTA-iteration, "
          f"{warps} warps, {regs} registers")
    print("  mix: " + ", ".join(f"{op} {n}" for op, n in ops.most_common()))
    print("  lane-ops per weight: " + ", ".join(f"{pipe} {per_weight.get(pipe, 0):.2f}"
                                               for pipe in ("alu", "fma", "cvt", "lsu", "mma", "other", "control"))
          + f"; all issued {issued:.2f}")
    return {"ops": dict(ops), "per_weight": per_weight, "issued": issued, "registers": regs}


def triton_cubin(fmt, dtype: str, config, imad_rotate: bool = False) -> bytes:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fp6llm.kernels import fpx_gemm as kernels
    constants = dict(kernels._plane_kwargs(fmt), GROUP_SIZE=0, HAS_BIAS=False, BLOCK_M=config.block_m,
                     BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=config.split_k, USE_DOT=config.use_dot,
                     EVEN_K=True, DOT_FP32=False, SWAP_AB=config.swap_ab, IMAD_ROTATE=imad_rotate)
    t = "fp16" if dtype == "float16" else "bf16"
    signature = {"x_ptr": f"*{t}", "p0_ptr": "*i32", "p1_ptr": "*i32", "p2_ptr": "*i32", "rot_ptr": "*i32",
                 "scale_ptr": "*fp32", "bias_ptr": "*fp32", "out_ptr": f"*{t}", "ws_ptr": "*fp32", "count_ptr": "*i32",
                 "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_om": "i32", "stride_scale_n": "i32",
                 "scale_factor": "fp32"}
    signature.update({name: "constexpr" for name in constants})
    aligned = [[i] for i, name in enumerate(signature) if name.endswith("_ptr") or name in ("K", "N", "stride_xm",
                                                                                             "stride_om")]
    source = ASTSource(kernels.fpx_gemm_kernel, signature, constexprs=constants,
                       attrs={tuple(a): [["tt.divisibility", 16]] for a in aligned})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    return compiled.asm["cubin"]


def cuda_cubin(fmt, dtype: str, m: int, fma_shifts: bool = False, prefetch_x: bool = True) -> bytes:
    from fp6llm.kernels.fpx_cuda import kernel_source, nvrtc_compile
    source = kernel_source(fmt, dtype == "bfloat16", 1 if m <= 8 else 2, False, fma_shifts=fma_shifts,
                           prefetch_x=prefetch_x)
    try:
        return nvrtc_compile(source, "sm_90a")
    except RuntimeError as err:
        if "not found" not in str(err):
            raise
        with tempfile.TemporaryDirectory() as tmp:  # no NVRTC library here: nvcc, if installed
            src, out = Path(tmp) / "k.cu", Path(tmp) / "k.cubin"
            src.write_text(source)
            subprocess.run(["nvcc", "-arch=sm_90a", "-cubin", "--use_fast_math", "-o", str(out), str(src)], check=True)
            return out.read_bytes()


def mid_cubin(fmt, dtype: str, m: int, row_tiles: int, warps: int) -> bytes:
    from fp6llm.kernels.fpx_cuda import mid_blocks_m, mid_kernel_source, nvrtc_compile
    return nvrtc_compile(mid_kernel_source(fmt, dtype == "bfloat16", mid_blocks_m(m), row_tiles, warps, False),
                         "sm_90a", "fpx_mid_m.cu")


def wgmma_cubin(fmt, dtype: str, m: int, wgs: int) -> bytes:
    from fp6llm.kernels.fpx_cuda import nvrtc_compile, wgmma_kernel_source, wgmma_resolve
    launch = wgmma_resolve(m, wgs=wgs)
    return nvrtc_compile(wgmma_kernel_source(fmt, dtype == "bfloat16", launch["n_x"], False, wgs, launch["x_ahead"],
                                             launch["min_ctas"]), "sm_90a", "fpx_wgmma.cu")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", default="e3m2")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--m", type=int, default=1, help="rows of x (picks the configuration)")
    parser.add_argument("--kernel", default="both", choices=["both", "triton", "cuda", "mid", "wgmma"])
    parser.add_argument("--row-tiles", type=int, default=2, help="the mid-M kernel's 16-row tiles per warp")
    parser.add_argument("--warps", type=int, default=4, help="the mid-M kernel's warps per CTA")
    parser.add_argument("--wgs", type=int, default=1, help="the wgmma kernel's warpgroups per CTA")
    parser.add_argument("--fma-shifts", action="store_true",
                        help="the CUDA kernel's variant with left shifts by kernel-parameter multipliers")
    parser.add_argument("--no-prefetch-x", action="store_true",
                        help="the CUDA kernel's variant that reads x when its tile is computed (prefetch_x=False)")
    parser.add_argument("--imad-rotate", action="store_true",
                        help="the Triton kernel's variant with field moves as multiplies (fpx_gemm's imad_rotate)")
    parser.add_argument("--json", help="also write the counts to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: unset it (the interpreter compiles nothing)")

    from fp6llm.formats import FPFormat
    from fp6llm.kernels.dispatch import heuristic_config
    fmt = FPFormat.parse(args.format)
    print(f"{fmt.name}, {args.dtype}, M = {args.m}, sm_90a")
    results = {}
    if args.kernel in ("both", "triton"):
        config = heuristic_config(args.m, 8192, 8192, 132)
        name = f"Triton fpx_gemm_kernel {config}" + (", imad_rotate" if args.imad_rotate else "")
        results["triton"] = report(name, triton_cubin(fmt, args.dtype, config, args.imad_rotate),
                                   config.num_warps, config.block_n * config.block_k)
    if args.kernel in ("both", "cuda"):
        # one warp, one loop pass = two 16 x 128 tiles (the ping-pong of register buffers)
        name = "CUDA fpx_small_m" + (", fma_shifts" if args.fma_shifts else "") + \
            (", x read at compute" if args.no_prefetch_x else "") + " (per warp)"
        results["cuda"] = report(name, cuda_cubin(fmt, args.dtype, args.m, args.fma_shifts, not args.no_prefetch_x),
                                 1, 2 * 16 * 128)
    if args.kernel == "mid":
        # one warp, one loop pass = two K tiles of row_tiles 16 x 128 tiles, times the rows of x of one CTA
        name = f"CUDA fpx_mid_m row_tiles={args.row_tiles} warps={args.warps} (per warp)"
        results["mid"] = report(name, mid_cubin(fmt, args.dtype, args.m, args.row_tiles, args.warps), 1,
                                2 * args.row_tiles * 16 * 128)
    if args.kernel == "wgmma":
        # one warp, one loop pass = two 16 x 128 tiles (the default launch for M: fpx_cuda.wgmma_launch); each
        # weight is multiplied with all the CTA's rows of x, so these are per weight and CTA, not per MAC
        name = f"CUDA fpx_wgmma wgs={args.wgs} (per warp)"
        results["wgmma"] = report(name, wgmma_cubin(fmt, args.dtype, args.m, args.wgs), 1, 2 * 16 * 128)
    if args.json:
        Path(args.json).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
