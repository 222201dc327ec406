"""The CUDA C++ kernels, compiled at run time through NVRTC, cached by source hash:

    out[M, N] = x[M, K] @ (decode(codes) * scale)[N, K].T (+ bias),  per-channel scales, K % 128 == 0

fpx_small_m (kernels/cuda/fpx_small_m.cu) for M <= 16 and fpx_mid_m (kernels/cuda/fpx_mid_m.cu: x shared by a
CTA's warps through shared memory) for M <= 128, both after the helpers of kernels/cuda/fpx_common.cuh. Each reads
the same layout-2 planes as the Triton kernel. The format enters as generated code: `dequant_source` writes, from
packing.placement, one line per weight pair (rotate + mask per plane, OR of the planes), so every shift amount and
mask is an immediate and the compiler can issue plain left shifts on the FMA pipe. Users need no build step:
NVRTC (libnvrtc, shipped with PyTorch's CUDA wheels or the nvidia-cuda-nvrtc package) compiles the source on first
use; the cubin is kept under ~/.cache/fp6llm/cuda (FP6LLM_CACHE_DIR overrides) by the hash of its
source and target.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import math
import os
import sys
import threading
from pathlib import Path

import torch

from ..formats import FPFormat
from ..packing import LANES, PAIRS_PER_LANE, TILE_K, placement, signed32, words_per_group
from . import launch
from .dispatch import SMALL_M_MAX, capability, measured_small_m, sm_count, waves_split
from .workspace import WORKSPACE
from .x_order import wgmma_x_order

SOURCE = Path(__file__).parent / "cuda" / "fpx_small_m.cu"
MID_SOURCE = Path(__file__).parent / "cuda" / "fpx_mid_m.cu"
COMMON = Path(__file__).parent / "cuda" / "fpx_common.cuh"  # helpers both CUDA kernels use
KERNEL_NAME = "fpx_small_m"
WARPS = 4
ROWS_PER_CTA = 16 * WARPS  # a 16-row tile per warp
MAX_M = SMALL_M_MAX  # the small-M kernel's rows (dispatch picks by it too)
FP16_EXP_BIAS = 15


# ---------------------------------------------------------------------------------------------------------------
# Source generation


def _hex(mask: int) -> str:
    return f"0x{mask:08X}u"


def _extract(word: str, mask: int, r: int, fma_shifts: bool) -> str:
    """C++ for rotl(word, r) & mask: no move, a left shift, a right shift or a rotate, whichever the mask needs; with
    fma_shifts a left shift multiplies by the kernel parameter pw.p<r> instead of an immediate."""
    bits = [b for b in range(32) if mask >> b & 1]
    m = _hex(mask)
    if r == 0:
        return f"({word} & {m})"
    if min(bits) >= r:  # every kept bit comes from the left shift
        return f"(shl_fma({word}, pw.p{r}) & {m})" if fma_shifts else f"(shl_fma<{1 << r}u>({word}) & {m})"
    if max(bits) < r:  # every kept bit wraps around: x >> (32 - r)
        return f"(shr_fma<{1 << r}u>({word}) & {m})"
    return f"rotl_masked<{1 << r}u, {m}>({word})"


def _extracts(plane, slot: int) -> list:
    """(mask, rotation) of each move of one slot of a plane: one for a tied plane, else one per field."""
    if plane.tied:
        return [(plane.mask, plane.rotations[slot][0])]
    return [(field.mask, r) for field, r in zip(plane.fields, plane.rotations[slot])]


def shifts(fmt: FPFormat) -> tuple:
    """The left shifts r of fmt's dequant_tile (fields moved by x << r alone), ascending: the fma_shifts variant
    takes 2^r of each as a kernel parameter."""
    return tuple(sorted({r for plane in placement(fmt) for slot in range(plane.slots)
                         for mask, r in _extracts(plane, slot)
                         if r and min(b for b in range(32) if mask >> b & 1) >= r}))


def dequant_source(fmt: FPFormat, fma_shifts: bool = False) -> tuple:
    """C++ for the format's constants: Tile's plane registers, their loads, the kernel's Powers parameters (none
    unless fma_shifts), and dequant_tile (32 pairs per lane)."""
    layout = placement(fmt)
    regs = " ".join(f"u32 w{p}[{2 * plane.width}];" for p, plane in enumerate(layout))
    loads = []
    for p, plane in enumerate(layout):
        words, group = 2 * plane.width, words_per_group(plane.width)
        for first in range(0, words, group):
            offset = f"tile_index * {64 * plane.width} + {first // group * LANES * group} + lane * {group}"
            if group == 4:
                loads.append(f"{{ uint4 v = load_stream(p{p} + {offset}); tile.w{p}[{first}] = v.x; "
                             f"tile.w{p}[{first + 1}] = v.y; tile.w{p}[{first + 2}] = v.z; "
                             f"tile.w{p}[{first + 3}] = v.w; }}")
            else:
                loads.append(f"{{ uint2 v = load_stream2(p{p} + {offset}); tile.w{p}[{first}] = v.x; "
                             f"tile.w{p}[{first + 1}] = v.y; }}")
    lines = []
    for q in range(PAIRS_PER_LANE):
        terms = []
        for p, plane in enumerate(layout):
            word, slot = divmod(q, plane.slots)
            terms += [_extract(f"tile.w{p}[{word}]", mask, r, fma_shifts) for mask, r in _extracts(plane, slot)]
        lines.append(f"    a[{q}] = {' | '.join(terms)};")
    used = shifts(fmt) if fma_shifts else ()
    return "\n".join([
        f"#define PLANE_REGS {regs}",
        "#define POWER_PARAMS " + "".join(f", u32 pw_{r}" for r in used),
        "#define POWERS {" + ", ".join(f"pw_{r}" for r in used) + "}",
        "#define LOAD_PLANES " + " ".join(loads),
        # the XOR of the first word of every load of LOAD_PLANES: a value that needs all of them
        "#define TILE_WORDS_XOR(TILE) (" + " ^ ".join(
            f"TILE.w{p}[{first}]" for p, plane in enumerate(layout)
            for first in range(0, 2 * plane.width, words_per_group(plane.width))) + ")",
        "struct Tile;",
    ]), "\n".join(["struct Powers { " + " ".join(f"u32 p{r};" for r in used) + " };",
        "__device__ __forceinline__ void dequant_tile(const Tile& tile, const Powers& pw, u32 (&a)[32]) {",
        *lines, "}",
        # one k-step's four pairs (q = 4 ks .. 4 ks + 3; ks a constant once unrolled): the wgmma kernel's
        # interleaved consumer de-quantizes a k-step beside the wgmma of the ones before it
        "__device__ __forceinline__ void dequant_k16(const Tile& tile, const Powers& pw, u32 (&a)[32], int ks) {",
        *(f"    if (ks == {q // 4}) {line.strip()}" for q, line in enumerate(lines)), "}"])


def _translation_unit(kernel_file: Path, fmt: FPFormat, defines: list, fma_shifts: bool = False) -> str:
    """The generated defines, the shared helpers and the kernel's source with fmt's dequant_tile right after the
    kernel's Tile struct (dequant_tile needs the complete Tile): one NVRTC translation unit."""
    header, dequant = dequant_source(fmt, fma_shifts)
    body = COMMON.read_text() + "\n" + kernel_file.read_text()
    marker = "__device__ __forceinline__ void load_tile("
    body = body.replace(marker, dequant + "\n\n" + marker, 1)
    return "\n".join(defines + [f"// format {fmt.name}, layout 2 (packing.placement)",
                                header.replace("struct Tile;", "")]) + "\n" + body


CLUSTER_SPLIT_MAX = 8  # the portable cluster size: split-K in a cluster takes at most 8 CTAs per row block


def kernel_source(fmt: FPFormat, bf16: bool, n_blocks_m: int, has_bias: bool, min_blocks: int = 0,
                  fma_shifts: bool = False, prefetch_x: bool = True, cluster_split: int = 0,
                  pdl: bool = False, early_weights: bool = False, row_tiles: int = 1, w_ahead: int = 2) -> str:
    """The small-M kernel's translation unit for one (format, activation dtype, M blocks of 8, bias) case.
    min_blocks > 0 asks ptxas for that many resident CTAs per SM (__launch_bounds__: registers capped at 65536 /
    (128 x min_blocks)); fma_shifts: left shifts by multipliers passed as kernel parameters (``powers``), see the
    .cu file; prefetch_x False: x is read when its tile is computed, not a tile ahead (fewer registers);
    cluster_split 2..8 (sm_90): a launch of exactly that split, its CTAs of a row block a cluster that sums the
    partials in shared memory; pdl (sm_90): the kernel waits for the previous grid (griddepcontrol) before it
    touches memory, so it may be launched with programmatic stream serialization (launch_ex); early_weights
    (with pdl): but for its first weight tile, loaded before the wait (weights that no kernel of the stream writes:
    launch.static_weights); row_tiles 2: each warp multiplies two 16-row tiles with each load of x (half the x
    traffic through L1; x read at compute time, two warps per CTA); w_ahead: K tiles of weights in register
    buffers per warp, w_ahead - 1 of them in flight while one is computed (2: the ping-pong; 3-4: a ring)."""
    if w_ahead not in SMALL_W_AHEADS:
        raise ValueError(f"the small-M kernel keeps 2 to {SMALL_W_AHEADS[-1]} weight tiles in registers, not {w_ahead}")
    if row_tiles not in (1, 2) or (row_tiles > 1 and prefetch_x):
        raise ValueError(f"the small-M kernel takes 1 or 2 row tiles per warp (2 without prefetch_x), not {row_tiles}")
    if cluster_split and not 2 <= cluster_split <= CLUSTER_SPLIT_MAX:
        raise ValueError(f"split-K in a cluster takes 2 to {CLUSTER_SPLIT_MAX} CTAs per row block, not {cluster_split}")
    defines = [f"#define N_BLOCKS_M {n_blocks_m}", f"#define PREFETCH_X {int(prefetch_x)}",
               f"#define ROW_TILES {row_tiles}",
               f"#define IS_BF16 {int(bf16)}", f"#define HAS_BIAS {int(has_bias)}",
               *([f"#define W_AHEAD {w_ahead}"] if w_ahead != 2 else []),
               *([f"#define CLUSTER_SPLIT {cluster_split}"] if cluster_split else []),
               *(["#define PDL 1", f"#define EARLY_WEIGHTS {int(early_weights)}"] if pdl else [])]
    source = _translation_unit(SOURCE, fmt, defines, fma_shifts)
    if min_blocks:
        source = source.replace("__launch_bounds__(WARPS * 32)", f"__launch_bounds__(WARPS * 32, {min_blocks})", 1)
    return source


def mid_kernel_source(fmt: FPFormat, bf16: bool, n_blocks_m: int, row_tiles: int, warps: int,
                      has_bias: bool, pdl: bool = False) -> str:
    """The mid-M kernel's (cuda/fpx_mid_m.cu) translation unit: n_blocks_m n8 blocks of x rows per CTA (M per grid
    z = 8 n_blocks_m), row_tiles 16-row weight tiles per warp, warps per CTA; pdl (sm_90): it waits for the
    previous grid before its first memory access (launch_ex's pdl)."""
    defines = [f"#define N_BLOCKS_M {n_blocks_m}", f"#define ROW_TILES {row_tiles}", f"#define WARPS {warps}",
               f"#define IS_BF16 {int(bf16)}", f"#define HAS_BIAS {int(has_bias)}",
               *(["#define PDL 1"] if pdl else [])]
    return _translation_unit(MID_SOURCE, fmt, defines)


# ---------------------------------------------------------------------------------------------------------------
# NVRTC


def _find_nvrtc() -> ctypes.CDLL:
    """libnvrtc: PyTorch's own (CUDA wheels), else the nvidia-cuda-nvrtc pip package, else the system's."""
    if torch.cuda.is_available():
        try:
            return torch.cuda._utils._get_gpu_rtc_library()
        except Exception:  # an older torch without the helper: search like below
            pass
    candidates = []
    for root in sys.path:
        candidates += glob.glob(os.path.join(root, "nvidia", "*", "lib", "libnvrtc.so*"))
        candidates += glob.glob(os.path.join(root, "nvidia", "cu*", "lib", "libnvrtc.so*"))
    candidates += glob.glob("/usr/local/cuda*/lib64/libnvrtc.so*")
    for path in sorted(c for c in candidates if "builtins" not in c and "alt" not in c):
        try:
            # NVRTC opens libnvrtc-builtins by name at compile time: load the one beside it first
            for builtins in glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so*")):
                ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(path)
        except OSError:
            continue
    raise RuntimeError("NVRTC (libnvrtc) not found: install a CUDA build of PyTorch or `pip install nvidia-cuda-nvrtc`")


def nvrtc_compile(source: str, arch: str = "sm_90a", name: str = "fpx_small_m.cu", log: "list | None" = None,
                  options: tuple = ()) -> bytes:
    """Compile CUDA C++ to a cubin for ``arch`` with NVRTC; RuntimeError with the compiler log on failure. ``log``
    (a list) receives the log of a success too, e.g. ptxas's notes with options=("--ptxas-options=-v",)."""
    lib = _find_nvrtc()
    program = ctypes.c_void_p()

    def check(result, what):
        if result != 0:
            lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise RuntimeError(f"NVRTC {what} failed: {lib.nvrtcGetErrorString(result).decode()}")

    check(lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), name.encode(), 0, None, None), "create")
    options = [f"--gpu-architecture={arch}".encode(), b"-std=c++17", b"--use_fast_math", b"-default-device",
               *(o.encode() for o in options)]
    c_options = (ctypes.c_char_p * len(options))(*options)
    result = lib.nvrtcCompileProgram(program, len(options), c_options)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    text = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(program, text)
    if log is not None:
        log.append(text.value.decode(errors="replace"))
    if result != 0:
        lib.nvrtcDestroyProgram(ctypes.byref(program))
        raise RuntimeError(f"NVRTC could not compile {name} for {arch}:\n{text.value.decode(errors='replace')}")
    size = ctypes.c_size_t()
    check(lib.nvrtcGetCUBINSize(program, ctypes.byref(size)), "cubin size")
    cubin = ctypes.create_string_buffer(size.value)
    check(lib.nvrtcGetCUBIN(program, cubin), "cubin")
    lib.nvrtcDestroyProgram(ctypes.byref(program))
    return cubin.raw


def cache_dir() -> Path:
    return Path(os.environ.get("FP6LLM_CACHE_DIR", Path.home() / ".cache" / "fp6llm")) / "cuda"


def cached_cubin(source: str, arch: str, name: str = KERNEL_NAME) -> bytes:
    """The cubin of ``source`` (kernel ``name``) for ``arch``: from the cache when its hash is there, else compiled
    and stored."""
    path = _cache_path(source, arch, name)
    if path.exists():
        return path.read_bytes()
    cubin = nvrtc_compile(source, arch, f"{name}.cu")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(cubin)
        tmp.replace(path)
    except OSError:  # a read-only home: compile again next process
        pass
    return cubin


def _cache_path(source: str, arch: str, name: str) -> Path:
    digest = hashlib.sha256(f"{arch}\n{source}".encode()).hexdigest()[:24]
    return cache_dir() / f"{name}-{arch}-{digest}.cubin"


def _cache_one(job: tuple) -> None:
    cached_cubin(*job)


def precompile(sources, arch: str, name: str, workers: int = 16) -> None:
    """Compile ``sources`` (of kernel ``name``) for ``arch`` into the disk cache in parallel processes (NVRTC: 2-30 s
    a kernel, one core each), so that the launches that follow only load them; already cached ones are skipped."""
    import concurrent.futures
    jobs = sorted({(source, arch, name) for source in sources if not _cache_path(source, arch, name).exists()})
    if len(jobs) <= 1:
        for job in jobs:
            _cache_one(job)
        return
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs))) as pool:
        list(pool.map(_cache_one, jobs))


# ---------------------------------------------------------------------------------------------------------------
# Launch


_KERNELS: dict = {}


class LaunchAttribute(ctypes.Structure):
    """CUlaunchAttribute (cuda.h): an id, 4 bytes of padding, a 64-byte value union."""
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_ubyte * 64)]


class LaunchConfig(ctypes.Structure):
    """CUlaunchConfig (cuda.h), the argument of cuLaunchKernelEx."""
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID


def _slot(arg):
    """A kernel argument as torch's _CudaKernel passes it: (its ctypes type, its value) for a CUDA tensor (its data
    pointer), an int (a C int) or a float (a C double)."""
    if isinstance(arg, torch.Tensor):
        return ctypes.c_void_p, arg.data_ptr()
    if isinstance(arg, bool) or not isinstance(arg, (int, float)):
        raise TypeError(f"a kernel argument must be a tensor, an int or a float, not {type(arg).__name__}")
    return (ctypes.c_int, arg) if isinstance(arg, int) else (ctypes.c_double, arg)


class _Launcher:
    """One kernel's launches on one grid, block, shared size and PDL flag, through cuLaunchKernelEx: the launch
    configuration and the argument slots (ctypes objects, microseconds each to make) are built once; a call writes
    its values into the slots and launches on the current stream (cuLaunchKernelEx copies the arguments before it
    returns). An eager forward launches hundreds of GEMMs: the host's time per launch is the prefill's time."""

    def __init__(self, kernel, grid, block, shared: int, pdl: bool, kinds: tuple):
        self.kernel, self.func = kernel, kernel.func  # held: _LAUNCHERS keys on the kernel's id
        self.slots = [kind() for kind in kinds]
        self.array = (ctypes.c_void_p * len(self.slots))(*[ctypes.addressof(slot) for slot in self.slots])
        self.attributes = (LaunchAttribute * 1)()
        self.attributes[0].id = LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        ctypes.memmove(self.attributes[0].value, ctypes.byref(ctypes.c_int(1)), 4)
        self.config = LaunchConfig(*grid, *block, shared, None, self.attributes, 1 if pdl else 0)
        self.config_ref = ctypes.byref(self.config)
        self.libcuda = torch.cuda._utils._get_gpu_runtime_library()
        self.lock = threading.Lock()

    def __call__(self, values) -> None:
        stream = torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())  # what Triton's launcher reads
        with self.lock:
            for slot, value in zip(self.slots, values):
                slot.value = value
            self.config.hStream = stream
            result = self.libcuda.cuLaunchKernelEx(self.config_ref, self.func, self.array, None)
        if result != 0:
            raise RuntimeError(f"cuLaunchKernelEx failed: CUresult {result}")


_LAUNCHERS: dict = {}
_MAX_LAUNCHERS = 4096  # eager forwards of many prompt lengths make many grids: start over past this many


def launch_ex(kernel, grid, block, args, shared_mem: int = 0, pdl: bool = False) -> None:
    """Launch a loaded kernel through cuLaunchKernelEx on the current stream (a _Launcher made once per kernel,
    grid, block, shared size, PDL flag and argument types); pdl: with programmatic stream serialization (the grid
    may start while the previous kernel of the stream drains: only for a kernel that waits with griddepcontrol
    before it reads what that kernel writes, kernel_source's pdl)."""
    slots = [_slot(arg) for arg in args]
    key = (id(kernel), tuple(grid), tuple(block), shared_mem, pdl, tuple(kind for kind, _ in slots))
    launcher = _LAUNCHERS.get(key)
    if launcher is None:
        if len(_LAUNCHERS) >= _MAX_LAUNCHERS:
            _LAUNCHERS.clear()
        launcher = _LAUNCHERS[key] = _Launcher(kernel, grid, block, shared_mem, pdl, key[-1])
    launcher([value for _, value in slots])


def _arch(device) -> str:
    major, minor = capability(device)
    return f"sm_{major}{minor}{'a' if major == 9 else ''}"


def _registers(kernel) -> int:
    """Registers per thread of a loaded kernel (cuFuncGetAttribute, CU_FUNC_ATTRIBUTE_NUM_REGS)."""
    value = ctypes.c_int()
    libcuda = torch.cuda._utils._get_gpu_runtime_library()
    if libcuda.cuFuncGetAttribute(ctypes.byref(value), 4, kernel.func) != 0:
        return 80
    return value.value


def _load(key: tuple, source, name: str, warps: int, device):
    """(kernel, resident CTAs per SM by its registers) of ``source()``'s kernel ``name``, compiled and loaded once
    per process and ``key``."""
    if key not in _KERNELS:
        cubin = cached_cubin(source(), _arch(device), name)
        with torch.cuda.device(device):
            kernel = torch.cuda._utils._cuda_load_module(cubin, [name])[name]
        per_warp = -(-_registers(kernel) * 32 // 256) * 256  # registers are allocated per warp in 256s
        # an SM holds at most 64 warps (16 CTAs of 4: the small-M kernel's cap before the mid-M kernel came)
        _KERNELS[key] = (kernel, max(1, min(64 // warps, 65536 // (per_warp * warps))))
    return _KERNELS[key]


def _kernel(fmt: FPFormat, dtype: torch.dtype, n_blocks_m: int, has_bias: bool, min_blocks: int, fma_shifts: bool,
            prefetch_x: bool, device, cluster_split: int = 0, pdl: bool = False, row_tiles: int = 1,
            w_ahead: int = 2):
    """The small-M kernel for this case (see _load)."""
    early = pdl and EARLY_WEIGHTS and launch.weights_static()
    key = (KERNEL_NAME, fmt, dtype, n_blocks_m, has_bias, min_blocks, fma_shifts, prefetch_x, cluster_split, pdl,
           early, row_tiles, w_ahead, torch.device(device).index)
    return _load(key, lambda: kernel_source(fmt, dtype == torch.bfloat16, n_blocks_m, has_bias, min_blocks,
                                            fma_shifts, prefetch_x, cluster_split, pdl, early, row_tiles, w_ahead),
                 KERNEL_NAME, WARPS // row_tiles, device)


def _takes(fmt: FPFormat, group_size, x: torch.Tensor, k: int, max_m: int) -> bool:
    """Whether a CUDA kernel of up to ``max_m`` rows takes the case: sm_80+, per-channel scales, <= 4 exponent
    bits, FP16/BF16 x of unit column stride, 16-byte aligned rows, K a multiple of the packed tile."""
    return (x.is_cuda and hasattr(torch.cuda, "_utils") and capability(x.device) >= (8, 0)
            and group_size is None and fmt.exp_bits <= 4 and x.dtype in (torch.float16, torch.bfloat16)
            and x.dim() == 2 and 1 <= x.shape[0] <= max_m and k % TILE_K == 0 and x.stride(1) == 1
            and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0)


def supports(fmt: FPFormat, group_size, x: torch.Tensor, n: int, k: int) -> bool:
    """Whether the small-M kernel takes the case (else the Triton kernel does)."""
    return _takes(fmt, group_size, x, k, MAX_M)


MIN_BLOCKS = 0  # __launch_bounds__ minimum CTAs per SM (0: ptxas's choice, 80 registers: 6 CTAs)
# Left shifts by kernel-parameter multipliers (kernel_source's fma_shifts): e3m2 1.48 -> 1.09 ALU lane-ops per weight
# at 91 -> 94 registers (the same 5 CTAs per SM), but e2m3 91 -> 120 registers (4 CTAs); off until the device run
# times both (bench/kernel_v2.py --fma-shifts), since the warps were latency-bound, not ALU-bound (ncu, 2026-12-01).
FMA_SHIFTS = False


def choose_split(n: int, k: int, m: int, num_sms: int, resident: int = 6) -> int:
    """Split-K degree. Each warp is latency-bound (ncu on an H200, 2026-12-01: one instruction per ~14 cycles per
    warp, 0.5 eligible warps per scheduler), so a CTA's time is its K tiles whatever else runs beside it: the waves
    model of dispatch.waves_split, with the partial sums (64 x M float32 written and read back) at M / 12 of a tile
    and the last CTA's reduction at SUM_COST of a tile per split. Every CTA keeps >= 4 K tiles. A GPU's measured
    table (bench/tune.py) overrides this for the shapes it timed (dispatch.measured_small_m)."""
    return waves_split(-(-n // ROWS_PER_CTA), k // TILE_K, num_sms, resident, partial_cost=m / 12,
                       sum_cost=SUM_COST)


# The last CTA's reduction per split, in K tiles: fitted to the H200's split sweeps of the small-M kernel
# (bench/results/tune-h200-2026-12-02/tune-small-cuda.log and tune-bf16-cuda.log: 40 + 24 shape x M cases, each
# timed at 11 splits), with the residents the kernel runs at (5 CTAs per SM at M <= 8, 4 above). The model's split
# then costs a geo-mean 1.014x (FP16) / 1.010x (BF16) the measured best, at most 1.085x / 1.049x; with the earlier
# unfitted 0.1: 1.021x / 1.015x, at most 1.139x / 1.093x. Only shapes without a table entry use the model.
SUM_COST = 0.4



EARLY_WEIGHTS = True  # with PDL within launch.static_weights(): the first weight tile loaded before the wait
SMALL_W_AHEADS = (2, 3, 4)  # the small-M kernel's weight tiles in registers per warp (kernel_source's w_ahead)


def small_m_launch(measured, split: "int | None", prefetch_x: "bool | None", cluster_split: "bool | None",
                   row_tiles: "int | None", w_ahead: "int | None" = None) -> tuple:
    """(split, prefetch_x, cluster_split, row_tiles, w_ahead) of a small-M launch: the caller's where given, else
    the table's (``measured``, ignored where it measured another kernel), else the defaults (the split model: None;
    x a tile ahead; the workspace's sums; one row tile; two weight tiles in registers). The table's two row tiles
    are not taken beside an explicit prefetch_x=True, which only one row tile allows (bench/tune.py's launches hit
    that, 2026-12-04)."""
    if measured is not None and measured.kernel != "small":  # the table measured the mid-M or wgmma kernel faster
        measured = None
    if row_tiles is None:
        row_tiles = measured.row_tiles if measured is not None and prefetch_x is not True else 1
    if prefetch_x is None:
        prefetch_x = (measured.prefetch_x if measured is not None else True) and row_tiles == 1
    if cluster_split is None:
        cluster_split = measured.cluster_split if measured is not None else False
    if split is None:
        split = measured.split if measured is not None else None
    if w_ahead is None:
        w_ahead = measured.w_ahead if measured is not None else 2
    return split, prefetch_x, cluster_split, row_tiles, w_ahead


def cluster_of(k_tiles: int, split: "int | None", cluster_split: bool) -> int:
    """The cluster size a small-M launch of ``split`` over k_tiles runs its split-K in (the split it runs, with no
    empty CTAs, where that is 2..CLUSTER_SPLIT_MAX); 0: summed through the workspace."""
    if not cluster_split or split is None:
        return 0
    kps = -(-k_tiles // split)
    cluster = -(-k_tiles // kps)
    return cluster if 2 <= cluster <= CLUSTER_SPLIT_MAX else 0


def fpx_small_m(x: torch.Tensor, planes, scales: torch.Tensor, bias, fmt: FPFormat, n: int, k: int,
                split: "int | None" = None, min_blocks: int = MIN_BLOCKS,
                fma_shifts: bool = FMA_SHIFTS, prefetch_x: "bool | None" = None,
                cluster_split: "bool | None" = None, pdl: "bool | None" = None,
                row_tiles: "int | None" = None, w_ahead: "int | None" = None) -> torch.Tensor:
    """out [M, N] in x's dtype for x [M <= 16, K] (see supports); split / min_blocks / fma_shifts / prefetch_x /
    cluster_split / row_tiles (2: two 16-row tiles per warp share each load of x, without prefetch_x) / w_ahead
    (weight tiles in registers per warp, 2-4) override the defaults (tests, benchmarks): the launch measured for
    this shape on this GPU (dispatch.measured_small_m), else choose_split's model with prefetch_x on, one row tile
    and two weight tiles per warp and the partials summed through the workspace. cluster_split: on sm_90 at a
    split of 2..8, the row block's CTAs form a cluster and sum their partials in shared memory (no workspace). pdl (sm_90; None: launch.enabled, see
    kernels/launch.py): launched with programmatic stream serialization, it may start while the previous kernel
    drains, and waits for it before it touches memory."""
    m = x.shape[0]
    split, prefetch_x, cluster_split, row_tiles, w_ahead = small_m_launch(
        measured_small_m(m, n, k, fmt, x.dtype, x.device), split, prefetch_x, cluster_split, row_tiles, w_ahead)
    k_tiles = k // TILE_K
    hopper = capability(x.device) >= (9, 0)  # clusters, programmatic launch
    cluster = cluster_of(k_tiles, split, cluster_split and hopper)
    pdl = (launch.enabled(x.device) if pdl is None else pdl) and hopper
    kernel, resident = _kernel(fmt, x.dtype, 1 if m <= 8 else 2, bias is not None, min_blocks, fma_shifts,
                               prefetch_x, x.device, cluster, pdl, row_tiles, w_ahead)
    threads = WARPS // row_tiles * 32
    if split is None:
        split = choose_split(n, k, m, sm_count(x.device), resident)
    row_blocks = -(-n // ROWS_PER_CTA)
    kps = -(-k_tiles // split)
    split = -(-k_tiles // kps)  # no empty CTAs
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    # Reserve what this layer needs at any M <= 16 (at most k_tiles / 4 splits of 16-row partials), so that a CUDA
    # graph captured at another batch size never finds the workspace too small.
    ws, counts = WORKSPACE.reserve(x.device, max(1, k_tiles // 4) * row_blocks * ROWS_PER_CTA * MAX_M, row_blocks) \
        if split > 1 and not cluster else (out, out)
    padded = list(planes) + [planes[0]] * (3 - len(planes))
    args = [x, x.stride(0), *padded, scales, bias if bias is not None else scales, out, out.stride(0), ws, counts, m,
            n, k, float(2.0 ** (FP16_EXP_BIAS - fmt.bias)), kps, *(_powers(fmt) if fma_shifts else ())]
    launch_ex(kernel, (row_blocks, split, 1), (threads, 1, 1), args, pdl=pdl)
    return out


@functools.lru_cache(maxsize=None)
def _powers(fmt: FPFormat) -> tuple:
    """The fma_shifts kernel's Powers parameters: 2^r for each of fmt's left shifts, as the C ints the launcher passes
    (2^31 as its two's-complement bits, what the u32 parameter reads)."""
    return tuple(signed32(1 << r) for r in shifts(fmt))


# ---------------------------------------------------------------------------------------------------------------
# The mid-M kernel (cuda/fpx_mid_m.cu): M up to MID_MAX_M, x rows in grid-z blocks of 8 n_blocks_m <= 64.

MID_KERNEL_NAME = "fpx_mid_m"
MID_MAX_M = 128
MID_MAX_BLOCKS_M = 8  # n8 blocks of x rows per CTA: 64 rows, 32-64 accumulator registers per row tile
MID_WORKSPACE_FLOATS = 1 << 24  # 64 MiB: the most split-K partials one mid-M launch may use (see fpx_mid_m)


def mid_supports(fmt: FPFormat, group_size, x: torch.Tensor, n: int, k: int) -> bool:
    """Whether the mid-M kernel takes the case: what the small-M kernel takes, at 1 <= M <= MID_MAX_M."""
    return _takes(fmt, group_size, x, k, MID_MAX_M)


def mid_blocks_m(m: int, most: int = MID_MAX_BLOCKS_M) -> int:
    """n8 blocks of x rows per CTA for M rows: all of them up to ``most`` (8: 64 rows), else as even a split over
    grid z as that allows (M = 72 runs 2 x 40 rows, not 64 + 8)."""
    if not 1 <= most <= MID_MAX_BLOCKS_M:
        raise ValueError(f"the mid-M kernel takes 1 to {MID_MAX_BLOCKS_M} n8 blocks of x rows per CTA, not {most}")
    blocks = -(-m // 8)
    z = -(-blocks // most)
    return -(-blocks // z)


def _mid_kernel(fmt: FPFormat, dtype: torch.dtype, n_blocks_m: int, row_tiles: int, warps: int, has_bias: bool,
                device, pdl: bool = False):
    key = (MID_KERNEL_NAME, fmt, dtype, n_blocks_m, row_tiles, warps, has_bias, pdl, torch.device(device).index)
    return _load(key, lambda: mid_kernel_source(fmt, dtype == torch.bfloat16, n_blocks_m, row_tiles, warps,
                                                has_bias, pdl), MID_KERNEL_NAME, warps, device)


def mid_split_cap(n_pad: int, m_pad: int, k_tiles: int) -> int:
    """The largest split-K a mid-M launch may use: every CTA keeps >= 4 K tiles, and the partials (split x n_pad x
    m_pad floats) fit MID_WORKSPACE_FLOATS, which is reserved whole for the layer on first use, so the workspace
    never has to grow for a later M."""
    return max(1, min(k_tiles // 4, MID_WORKSPACE_FLOATS // (n_pad * m_pad)))


def grid_split_cap(n: int, m: int, k: int, rows_per_cta: int, m_per_cta: int) -> int:
    """mid_split_cap of a launch on grid (z blocks of m_per_cta rows of x, row blocks of rows_per_cta): the split
    _launch_split_k clamps to."""
    return mid_split_cap(-(-n // rows_per_cta) * rows_per_cta, -(-m // m_per_cta) * m_per_cta, k // TILE_K)


def _grid_waves_split(n: int, k: int, m: int, rows_per_cta: int, m_per_cta: int, num_sms: int,
                      resident: int) -> int:
    """Split-K by the waves model (dispatch.waves_split) over ceil(N / rows) x z CTAs; the partial of a CTA (rows x
    m_per_cta float32, written and read back) costs about M / 12 K tiles as in the small-M model."""
    return waves_split(-(-n // rows_per_cta) * -(-m // m_per_cta), k // TILE_K, num_sms, resident,
                       partial_cost=m / 12, sum_cost=SUM_COST)


def choose_mid_split(n: int, k: int, m: int, rows_per_cta: int, num_sms: int, resident: int) -> int:
    """The mid-M kernel's split-K at the default rows of x per CTA (_grid_waves_split)."""
    return _grid_waves_split(n, k, m, rows_per_cta, 8 * mid_blocks_m(m), num_sms, resident)


MID_ROW_TILES = 2  # defaults where no table measured the launch (unmeasured guesses, 2026-12-02)
MID_WARPS = 4


def fpx_mid_m(x: torch.Tensor, planes, scales: torch.Tensor, bias, fmt: FPFormat, n: int, k: int,
              split: "int | None" = None, row_tiles: "int | None" = None,
              warps: "int | None" = None, blocks: "int | None" = None, pdl: "bool | None" = None) -> torch.Tensor:
    """out [M, N] in x's dtype for x [M <= MID_MAX_M, K] (see mid_supports); split / row_tiles / warps / blocks (n8
    blocks of x rows per CTA, at most MID_MAX_BLOCKS_M) override the launch measured for this shape on this GPU
    (dispatch.measured_small_m), else the defaults and the split model; pdl (None: launch.enabled) as fpx_small_m's."""
    m = x.shape[0]
    measured = measured_small_m(m, n, k, fmt, x.dtype, x.device)
    if measured is not None and measured.kernel == "mid":
        row_tiles = measured.row_tiles if row_tiles is None else row_tiles
        warps = measured.warps if warps is None else warps
        split = measured.split if split is None else split
        blocks = (measured.blocks or None) if blocks is None else blocks
    row_tiles = MID_ROW_TILES if row_tiles is None else row_tiles
    warps = MID_WARPS if warps is None else warps
    blocks = mid_blocks_m(m, MID_MAX_BLOCKS_M if blocks is None else blocks)
    # griddepcontrol is sm_90's: an explicit pdl on an older GPU launches as usual, as fpx_small_m's does
    pdl = (launch.enabled(x.device) if pdl is None else pdl) and capability(x.device) >= (9, 0)
    kernel, resident = _mid_kernel(fmt, x.dtype, blocks, row_tiles, warps, bias is not None, x.device, pdl)
    rows_per_cta = 16 * row_tiles * warps
    if split is None:
        split = choose_mid_split(n, k, m, rows_per_cta, sm_count(x.device), resident)
    return _launch_split_k(kernel, x, x, planes, scales, bias, fmt, n, k, rows_per_cta, 8 * blocks, split,
                           warps * 32, pdl=pdl)


def _launch_split_k(kernel, x: torch.Tensor, x_arg: torch.Tensor, planes, scales, bias, fmt: FPFormat, n: int,
                    k: int, rows_per_cta: int, m_per_cta: int, split: int, threads: int,
                    shared: int = 0, pdl: bool = False) -> torch.Tensor:
    """Launch a kernel on grid (z blocks of m_per_cta rows of x, row blocks of rows_per_cta, splits) with the mid-M
    kernels' arguments (x_arg as the kernel's x: the wgmma kernel's permuted copy); the split is capped by the
    reserved partials (grid_split_cap) and trimmed so that no CTA is empty."""
    m = x.shape[0]
    row_blocks, z = -(-n // rows_per_cta), -(-m // m_per_cta)
    k_tiles = k // TILE_K
    split = max(1, min(split, grid_split_cap(n, m, k, rows_per_cta, m_per_cta)))
    kps = -(-k_tiles // split)
    split = -(-k_tiles // kps)  # no empty CTAs
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    ws, counts = WORKSPACE.reserve(x.device, MID_WORKSPACE_FLOATS, row_blocks * z) if split > 1 else (out, out)
    padded = list(planes) + [planes[0]] * (3 - len(planes))
    args = [x_arg, x_arg.stride(0), *padded, scales, bias if bias is not None else scales, out, out.stride(0), ws,
            counts, m, n, k, float(2.0 ** (FP16_EXP_BIAS - fmt.bias)), kps]
    launch_ex(kernel, (z, row_blocks, split), (threads, 1, 1), args, shared, pdl=pdl)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The wgmma kernel (cuda/fpx_wgmma.cu, sm_90a only): the weight as wgmma's register A operand, N_X rows of x per CTA
# as its shared-memory B operand, grid z over more rows.

WGMMA_SOURCE = Path(__file__).parent / "cuda" / "fpx_wgmma.cu"
WGMMA_KERNEL_NAME = "fpx_wgmma"
WGMMA_MAX_N_X = 256  # x rows per CTA: 128 accumulators per thread (238 registers), 3 x 64 KiB of x buffers
WGMMA_MAX_SHARED = 227 * 1024  # an sm_90 CTA's most dynamic shared memory
WGMMA_MAX_M = 4096
WGMMA_EXTRA_DEFINES: list = []  # experiments (bench/wgmma_probe.py)
# setmaxnreg's hand-offs beside a producer, (launch, producer, consumer) registers per thread: the producer keeps
# what its copies need, the consumers take the rest for the loop, and all return to the launch's for the epilogue.
# Three consumers (512 threads, 128 each at launch): 32 x 128 + 160 x 384 = 65536 (sm_90a, 2026-12-04: no spills
# in the loop at 128 rows of x, ~100 bytes in the epilogue, which runs at 128). Two consumers on more than 128
# rows of x (384 threads, 168 at launch; up to 128 accumulators each): 40 x 128 + 232 x 256 = 168 x 384.
WGMMA_HAND_OFFS = {3: (65536 // 512, 32, 160), 2: (168, 40, 232)}


def wgmma_hand_off(n_x: int, wgs: int, producer: bool) -> "tuple | None":
    """(launch, producer, consumer) registers of the launch's setmaxnreg hand-off (WGMMA_HAND_OFFS), or None
    where the launch's own share holds the consumers: three consumers beside a producer, or two on more than 128
    rows of x."""
    if producer and (wgs == 3 or (wgs == 2 and n_x > 128)):
        return WGMMA_HAND_OFFS[wgs]
    return None


def wgmma_asm(n_x: int, bf16: bool) -> list:
    """The defines of fpx_wgmma.cu's wgmma instruction for N_X = n_x: WGMMA_ASM (the PTX, A from registers, B by
    descriptor, D += A B) and WGMMA_OUTS(d) (its n_x / 2 accumulator operands)."""
    if not (8 <= n_x <= 256 and n_x % 8 == 0):
        raise ValueError(f"wgmma takes N = 8..256 in steps of 8, not {n_x}")
    acc, kind = n_x // 2, "bf16" if bf16 else "f16"
    regs = ", ".join(f"%{i}" for i in range(acc))
    ptx = (f"{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{acc + 5}, 0;\\n"
           f"wgmma.mma_async.sync.aligned.m64n{n_x}k16.f32.{kind}.{kind} {{{regs}}}, "
           f"{{%{acc}, %{acc + 1}, %{acc + 2}, %{acc + 3}}}, %{acc + 4}, p, 1, 1, 0;\\n}}\\n")
    return [f'#define WGMMA_ASM "{ptx}"',
            "#define WGMMA_OUTS(d) " + ", ".join(f'"+f"(d[{i}])' for i in range(acc))]


def wgmma_kernel_source(fmt: FPFormat, bf16: bool, n_x: int, has_bias: bool, wgs: int = 1, x_ahead: int = 1,
                        min_ctas: int = 1, pdl: bool = False, producer: bool = False, w_ahead: int = 2,
                        interleave: bool = False) -> str:
    """The wgmma kernel's translation unit: n_x rows of x per CTA (grid z covers more), wgs warpgroups (64 weight
    rows each) per CTA, x x_ahead K tiles in flight, registers for min_ctas CTAs per SM (__launch_bounds__); pdl
    (sm_90): it waits for the previous grid before its first memory access (launch_ex's pdl). producer: a
    warpgroup of its own copies x into an mbarrier ring of x_ahead + 1 stages (warp specialization), beside one,
    two or three consumer warpgroups (three: one CTA per SM, the producer's registers handed to them for the loop,
    setmaxnreg); w_ahead: K tiles of weights in flight per warp (register buffers, 2-4); interleave: each
    warpgroup de-quantizes k-step by k-step beside the wgmma of the k-steps before it (up to 7 in flight) instead
    of waiting for each tile's (beside a producer with x >= 2 tiles ahead; without one, one more tile of x in
    shared memory). x comes permuted (wgmma_x_order)."""
    hand_off = wgmma_hand_off(n_x, wgs, producer)
    if hand_off is not None and min_ctas != 1:
        raise ValueError(f"the wgmma kernel hands the producer's registers to its {wgs} consumers (setmaxnreg) "
                         f"at one CTA per SM, not {min_ctas}")
    if wgs not in (1, 2, 4) and not (wgs == 3 and producer and min_ctas == 1):
        raise ValueError(f"the wgmma kernel runs 1, 2 or 4 warpgroups per CTA (3 beside a producer, one CTA per SM), "
                         f"not {wgs}" + (" beside a producer" if producer else "") + f" at {min_ctas} CTAs per SM")
    if w_ahead not in (2, 3, 4):
        raise ValueError(f"the wgmma kernel keeps 2-4 K tiles of weights in flight, not {w_ahead}")
    if interleave and producer and x_ahead < 2:
        # its consumers release a stage of x one tile later: with one tile ahead the producer would wait for the
        # stage a consumer releases only after the tile it waits for
        raise ValueError("the wgmma kernel interleaves its de-quantization with the wgmma beside a producer "
                         f"warpgroup with x 2 or more tiles ahead, not {x_ahead}")
    if not wgmma_registers_fit(n_x, wgs, min_ctas, producer, w_ahead):
        raise ValueError(f"the wgmma kernel cannot keep {n_x // 2} accumulators and {w_ahead} weight tiles per "
                         f"thread at {min_ctas} CTAs of {wgs + producer} warpgroups per SM "
                         f"({_consumer_registers(n_x, wgs, min_ctas, producer)} registers per thread)")
    if x_ahead not in ((1, 2, 3, 4, 5, 6) if producer else (1, 2, 3, 4)):
        raise ValueError(f"the wgmma kernel keeps 1-4 K tiles of x in flight (1-6 with a producer), not {x_ahead}")
    shared = wgmma_shared_bytes(n_x, x_ahead, interleave and not producer)
    if shared > WGMMA_MAX_SHARED - 256:  # the mbarriers and split-K's counter: static
        raise ValueError(f"the wgmma kernel's x buffers for {n_x} rows {x_ahead} tiles ahead take "
                         f"{shared} bytes of shared memory, more than a CTA's "
                         f"{WGMMA_MAX_SHARED}")
    defines = [f"#define N_X {n_x}", f"#define WGS {wgs}", f"#define IS_BF16 {int(bf16)}",
               f"#define HAS_BIAS {int(has_bias)}", f"#define X_AHEAD {x_ahead}", f"#define MIN_CTAS {min_ctas}",
               f"#define PRODUCER {int(producer)}", f"#define W_AHEAD {w_ahead}",
               *(["#define INTERLEAVE 1"] if interleave else []),
               *([f"#define LAUNCH_REGS {hand_off[0]}", f"#define PRODUCER_REGS {hand_off[1]}",
                  f"#define CONSUMER_REGS {hand_off[2]}"] if hand_off else []),  # setmaxnreg's hand-off
               *(["#define PDL 1"] if pdl else []), *wgmma_asm(n_x, bf16), *WGMMA_EXTRA_DEFINES]
    return _translation_unit(WGMMA_SOURCE, fmt, defines)


def wgmma_registers_fit(n_x: int, wgs: int, min_ctas: int, producer: bool = False, w_ahead: int = 2) -> bool:
    """Whether a consumer thread's registers hold its n_x / 2 accumulators, A (32), w_ahead raw weight tiles (12
    each) and addresses (~38; 8 more beyond two tiles: four tiles at 64 rows of x and 128 registers spilled in the
    loop, sm_90a, 2026-12-04) at this launch."""
    needed = n_x // 2 + 46 + 12 * w_ahead + (8 if w_ahead > 2 else 0)
    return _consumer_registers(n_x, wgs, min_ctas, producer) >= needed


def _consumer_registers(n_x: int, wgs: int, min_ctas: int, producer: bool) -> int:
    """A consumer thread's registers in the loop: its share of an SM's 65536 at this launch, or what setmaxnreg
    hands it (wgmma_hand_off)."""
    hand_off = wgmma_hand_off(n_x, wgs, producer)
    return hand_off[2] if hand_off else 65536 // (128 * (wgs + producer) * min_ctas)


def wgmma_shared_bytes(n_x: int, x_ahead: int = 1, previous: bool = False) -> int:
    """Dynamic shared memory of one CTA: x_ahead + 1 K tiles of x (n_x rows x 256 bytes; one more with
    ``previous``: the interleaved kernel without a producer keeps the previous tile's) and 1 KiB to align them."""
    return (x_ahead + 1 + previous) * n_x * 256 + 1024


def wgmma_supports(fmt: FPFormat, group_size, x: torch.Tensor, n: int, k: int) -> bool:
    """Whether the wgmma kernel takes the case: what the small-M kernel takes, on sm_90 (wgmma), M <= WGMMA_MAX_M."""
    return (_takes(fmt, group_size, x, k, WGMMA_MAX_M)
            and capability(x.device) == (9, 0))


def _check_n_x(n_x: int) -> None:
    if not 8 <= n_x <= WGMMA_MAX_N_X or n_x % 8:
        raise ValueError(f"the wgmma kernel takes 8 to {WGMMA_MAX_N_X} x rows per CTA in steps of 8, not {n_x}")


def wgmma_n_x(m: int, most: int = 128) -> int:
    """x rows per CTA for M rows: all of them (rounded up to 8) up to ``most``, else as even a split over grid z as
    that allows (M = 160 at most 128 runs 2 x 80 rows, not 128 + 32)."""
    _check_n_x(most)
    z = -(-m // most)
    return -(-(-(-m // z)) // 8) * 8


def _wgmma_kernel(fmt: FPFormat, dtype: torch.dtype, n_x: int, wgs: int, has_bias: bool, device, x_ahead: int = 1,
                  min_ctas: int = 1, pdl: bool = False, producer: bool = False, w_ahead: int = 2,
                  interleave: bool = False):
    key = (WGMMA_KERNEL_NAME, fmt, dtype, n_x, wgs, has_bias, x_ahead, min_ctas, pdl, producer, w_ahead, interleave,
           tuple(WGMMA_EXTRA_DEFINES), torch.device(device).index)
    fresh = key not in _KERNELS
    kernel, resident = _load(key, lambda: wgmma_kernel_source(fmt, dtype == torch.bfloat16, n_x, has_bias, wgs,
                                                              x_ahead, min_ctas, pdl, producer, w_ahead,
                                                              interleave),
                             WGMMA_KERNEL_NAME, 4 * (wgs + producer), device)
    shared = wgmma_shared_bytes(n_x, x_ahead, interleave and not producer)
    hand_off = wgmma_hand_off(n_x, wgs, producer)
    if fresh and hand_off and _registers(kernel) != hand_off[0]:
        # setmaxnreg hands exactly what the launch gave: registers short of it would leave the consumers waiting
        del _KERNELS[key]
        raise RuntimeError(f"ptxas gave the {wgs}-consumer wgmma kernel {_registers(kernel)} registers per thread, "
                           f"not {hand_off[0]}: its setmaxnreg hand-off would not add up")
    if fresh:
        # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES (8): above 48 KiB a kernel must ask for it
        libcuda = torch.cuda._utils._get_gpu_runtime_library()
        if libcuda.cuFuncSetAttribute(kernel.func, 8, shared) != 0:
            raise RuntimeError(f"fpx_wgmma: the device refused {shared} bytes of shared memory per CTA")
        kernel._max_shared_mem_bytes = shared
        smem_per_sm = torch.cuda.get_device_properties(device).shared_memory_per_multiprocessor
        _KERNELS[key] = (kernel, max(1, min(resident, smem_per_sm // (shared + 1024))))
    return _KERNELS[key] + (shared,)


def wgmma_launch(m: int) -> dict:
    """The wgmma kernel's launch where no table measured one: up to 64 rows of x per CTA at M <= 64, else up to 128;
    one warpgroup per CTA with x two K tiles ahead, registers for 3 CTAs per SM at <= 64 rows (else 1): the most
    frequent winners of the H200 table (bench/tune.py, 2026-12-02: 10 of 18 entries at <= 64 rows, 11 of 21 above)."""
    n_x = wgmma_n_x(m, 64 if m <= 64 else 128)
    return {"n_x": n_x, "wgs": 1, "x_ahead": 2, "min_ctas": 3 if n_x <= 64 else 1}


def wgmma_resolve(m: int, n_x: "int | None" = None, wgs: "int | None" = None, x_ahead: "int | None" = None,
                  min_ctas: "int | None" = None, producer: bool = False, w_ahead: "int | None" = None,
                  interleave: bool = False) -> dict:
    """A wgmma launch with wgmma_launch(m)'s values where none is given; its CTAs per SM only with its own rows of x
    and warpgroups (other ones get 1: the default's registers may not hold their accumulators, nor do they beside a
    producer warpgroup)."""
    default = wgmma_launch(m) if n_x is None else dict(wgmma_launch(m), n_x=n_x, min_ctas=1)
    if min_ctas is None:
        min_ctas = default["min_ctas"] if wgs in (None, default["wgs"]) and not producer else 1
    resolved = {"n_x": default["n_x"], "wgs": default["wgs"] if wgs is None else wgs,
                "x_ahead": default["x_ahead"] if x_ahead is None else x_ahead, "min_ctas": min_ctas,
                "producer": bool(producer), "w_ahead": 2 if w_ahead is None else w_ahead,
                "interleave": bool(interleave)}
    _check_n_x(resolved["n_x"])
    return resolved


def wgmma_table_launch(measured, m: int, split: "int | None", n_x: "int | None", wgs: "int | None",
                       x_ahead: "int | None", min_ctas: "int | None", producer: "bool | None",
                       w_ahead: "int | None", interleave: "bool | None" = None) -> tuple:
    """(split, wgmma_resolve's launch) of a wgmma launch: the table's (``measured``, ignored where it measured another
    kernel) whole where the caller gives none of its shape (n_x, wgs, x_ahead, min_ctas, producer, w_ahead,
    interleave), else the
    caller's fields and the defaults for the rest, never a mix of the table's and the caller's (its producer beside
    a caller's one warpgroup at 4 CTAs per SM made a launch the kernel refuses, bench/tune.py, 2026-12-04). The
    caller's split goes with either."""
    shape = (n_x, wgs, x_ahead, min_ctas, producer, w_ahead, interleave)
    if measured is not None and measured.kernel == "wgmma" and all(field is None for field in shape):
        return (measured.split if split is None else split,
                wgmma_resolve(m, measured.n_x or None, measured.wgs, measured.x_ahead, measured.min_ctas,
                              measured.producer, measured.w_ahead, measured.interleave))
    return split, wgmma_resolve(m, n_x, wgs, x_ahead, min_ctas, bool(producer), w_ahead, bool(interleave))


def choose_wgmma_split(n: int, k: int, m: int, n_x: int, wgs: int, num_sms: int, resident: int) -> int:
    """The wgmma kernel's split-K (_grid_waves_split over 64 wgs weight rows and n_x rows of x per CTA)."""
    return _grid_waves_split(n, k, m, 64 * wgs, n_x, num_sms, resident)


def fpx_wgmma(x: torch.Tensor, planes, scales: torch.Tensor, bias, fmt: FPFormat, n: int, k: int,
              split: "int | None" = None, n_x: "int | None" = None, wgs: "int | None" = None,
              x_ahead: "int | None" = None, min_ctas: "int | None" = None,
              pdl: "bool | None" = None, producer: "bool | None" = None,
              w_ahead: "int | None" = None, x_ordered: bool = False,
              interleave: "bool | None" = None) -> torch.Tensor:
    """out [M, N] in x's dtype for x [M <= WGMMA_MAX_M, K] (see wgmma_supports). split / n_x (x rows per CTA, a
    multiple of 8 up to WGMMA_MAX_N_X) / wgs / x_ahead / min_ctas / producer (the warp-specialized variant) /
    w_ahead / interleave (wgmma_kernel_source's) override the launch measured for this shape on this GPU
    (dispatch.measured_small_m; wgmma_table_launch), else the defaults (wgmma_launch) and the split model; pdl
    (None: launch.enabled) as fpx_small_m's. x_ordered: x's columns already in the kernel's k order
    (wgmma_x_order_reference: a norm, silu_mul or attention wrote them so), else one wgmma_x_order launch makes
    that copy."""
    m = x.shape[0]
    split, resolved = wgmma_table_launch(measured_small_m(m, n, k, fmt, x.dtype, x.device), m, split, n_x, wgs,
                                         x_ahead, min_ctas, producer, w_ahead, interleave)
    n_x, wgs, x_ahead, min_ctas = resolved["n_x"], resolved["wgs"], resolved["x_ahead"], resolved["min_ctas"]
    producer, w_ahead, interleave = resolved["producer"], resolved["w_ahead"], resolved["interleave"]
    pdl = launch.enabled(x.device) if pdl is None else pdl
    kernel, resident, shared = _wgmma_kernel(fmt, x.dtype, n_x, wgs, bias is not None, x.device, x_ahead,
                                             min_ctas, pdl, producer, w_ahead, interleave)
    if split is None:
        split = choose_wgmma_split(n, k, m, n_x, wgs, sm_count(x.device), resident)
    return _launch_split_k(kernel, x, x if x_ordered else wgmma_x_order(x), planes, scales, bias, fmt, n, k,
                           64 * wgs, n_x, split, 128 * (wgs + producer), shared, pdl)
