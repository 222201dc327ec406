"""Which kernel configuration runs a given (M, N, K, format, dtype, GPU): a measured table, not run-time autotuning.

The table (kernels/configs/<gpu>.json, written by bench/tune.py on the device) maps an M bucket and a weight
shape to the fastest configuration measured for a format and dtype (``table_for``: a case without its own table
takes the nearest measured one: same plane widths, then same dtype, then any; the shipped H100 file holds e3m2 /
FP16 only); shapes it has not seen use the entry of the same M bucket nearest by log-distance of N and K, and GPUs
it has not seen (or M buckets it has no entry for) use the rules in ``heuristic_config``.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..formats import FPFormat
from ..packing import placement

MIN_BLOCK_K = 128  # one K tile of the packed layout (packing.TILE_K)
SMALL_GROUPS = (32, 64)  # group sizes under MIN_BLOCK_K: the kernel scales the de-quantized tile per group
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    use_dot: bool = True
    dequant_first: bool = False  # large M: de-quantize the whole weight once (block_n x block_k tiles), then cuBLAS
    swap_ab: bool = False  # compute out.T = W @ x.T (the weight as the MMA's A operand)

    def __post_init__(self):
        if not self.use_dot and self.block_m != 1:
            raise ValueError("the reduction (non-dot) path computes one row: block_m must be 1")
        if self.use_dot and min(self.block_m, self.block_n, self.block_k) < 16:
            raise ValueError(f"tl.dot needs blocks >= 16, got {self}")
        if self.block_k < MIN_BLOCK_K or self.block_k & (self.block_k - 1):
            raise ValueError(f"block_k must be a power of two >= {MIN_BLOCK_K}, got {self.block_k}")


def m_bucket(m: int) -> int:
    """The smallest bucket >= m (the last one for anything larger)."""
    return next((b for b in M_BUCKETS if m <= b), M_BUCKETS[-1])


def _index(device: torch.device) -> int:
    """A CUDA device's index (the current device for a bare "cuda")."""
    return device.index if device.index is not None else torch.cuda.current_device()


def device_key(device) -> str:
    """The name of a device's table file ("h200", "h100-80gb-hbm3"; "cpu"), read once per device (_device_key)."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    return _device_key(_index(device))


@functools.lru_cache(maxsize=None)
def _device_key(index: int) -> str:
    return torch.cuda.get_device_name(index).lower().replace("nvidia ", "").replace(" ", "-")


def tables_in(path: Path) -> dict:
    """{(format name, dtype name): {M bucket: {"NxK": entry}}} of a table file; {} without one. A file holds one
    table ("format", "dtype", "configs") or several ("tables": {"e3m2/float16": configs, ...}); bench/tune.py
    writes the second form."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if "tables" in data:
        return {tuple(name.split("/")): configs for name, configs in data["tables"].items()}
    return {(data.get("format", "e3m2"), data.get("dtype", "float16")): data["configs"]}


@functools.lru_cache(maxsize=None)
def _load_tables(key: str) -> dict:
    """tables_in of GPU ``key``'s file in CONFIG_DIR, read once."""
    return tables_in(CONFIG_DIR / f"{key}.json")


@functools.lru_cache(maxsize=None)
def _plane_widths(name: str) -> tuple:
    return tuple(plane.width for plane in placement(FPFormat.parse(name)))


@functools.lru_cache(maxsize=None)
def table_for(key: str, fmt_name: str, dtype_name: str) -> tuple:
    """(the (format, dtype) whose measurements GPU ``key`` uses for this case, its table): the table measured on
    this format and dtype; else one measured on a format of the same plane widths (the same bytes and nearly the
    same instructions: e3m2 for e2m3) and this dtype; else one of this dtype; else any table of the GPU (a
    measured configuration of another case beats the rules, 2026-11 H100 sweeps); ((None, None), {}) without one."""
    tables = _load_tables(key)
    widths = _plane_widths(fmt_name)
    for matches in (lambda f, d: (f, d) == (fmt_name, dtype_name),
                    lambda f, d: d == dtype_name and _plane_widths(f) == widths,
                    lambda f, d: d == dtype_name,
                    lambda f, d: True):
        for (f, d), configs in sorted(tables.items()):
            if matches(f, d):
                return (f, d), configs
    return (None, None), {}


def _num_sms(device) -> int:
    return sm_count(device) if torch.device(device).type == "cuda" else 132


@functools.lru_cache(maxsize=None)
def _device_facts(index: int) -> tuple:
    """((major, minor) compute capability, SM count) of CUDA device ``index``, read once per process."""
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


def capability(device) -> tuple:
    """The compute capability of a CUDA device (cached: torch's query costs microseconds per call)."""
    return _device_facts(_index(torch.device(device)))[0]


def sm_count(device) -> int:
    """The SM count of a CUDA device (cached)."""
    return _device_facts(_index(torch.device(device)))[1]


def waves_split(tiles: int, k_blocks: int, num_sms: int, resident: int, partial_cost: float,
                sum_cost: float = 0.0, min_blocks: int = 4) -> int:
    """Split-K degree by a waves model: a CTA's time is its K blocks whatever runs beside it (latency-bound warps,
    or one CTA per SM), so the kernel's time is (waves of ``resident`` CTAs per SM) x (K blocks per CTA +
    ``partial_cost``, writing its partial, in K blocks) + ``sum_cost`` x split (the last CTA of a tile reading
    every partial back); nothing of either unsplit. Every CTA keeps >= ``min_blocks`` K blocks; ties go to the
    smaller split."""
    best, best_cost = 1, float("inf")
    for split in range(1, max(1, k_blocks // min_blocks) + 1):
        waves = math.ceil(tiles * split / (num_sms * resident))
        cost = waves * (-(-k_blocks // split) + (partial_cost if split > 1 else 0.0)) + \
            (sum_cost * split if split > 1 else 0.0)
        if cost < best_cost - 1e-9:
            best, best_cost = split, cost
    return best


def heuristic_config(m: int, n: int, k: int, num_sms: int) -> KernelConfig:
    """Rules for a GPU with no measured table, distilled from the H100 table (docs/kernel-notes.md).

    Small M streams weights in 64 x 128 tiles with split-K to fill the SMs; mid M swaps A and B so the weight is
    the MMA's A operand; very large M de-quantizes once and calls cuBLAS.
    """
    if m <= 16:
        tiles = math.ceil(n / 64)
        split_k = 4 if tiles * 2 < num_sms else 2 if tiles < 2 * num_sms else 1
        return KernelConfig(16, 64, 128, split_k, num_warps=4, num_stages=4)
    if m <= 64:
        return KernelConfig(m_bucket(m), 128, 128, 2, num_warps=4, num_stages=4, swap_ab=True)
    if m <= 1024:
        # One CTA per SM (8 warps, ~180-240 registers, 120-140 KB of shared memory): a weight of 8192 rows has 64
        # tiles of 128 for 132 SMs at M = 128 (70b-o ran at 0.49x cuBLAS on an H200, 2026-12-01), so split K when
        # a wave would leave SMs idle. A split's partial (BLOCK_M x 128 float32: 64-128 KB against a K block's
        # 12 KB of weights and 32-64 KB of x) costs about one K block to write and one more to read back.
        block_m = 128 if m <= 128 else 256
        tiles = math.ceil(n / 128) * math.ceil(m / block_m)
        split_k = waves_split(tiles, math.ceil(k / MIN_BLOCK_K), num_sms, resident=1, partial_cost=1.0,
                              sum_cost=1.0)
        return KernelConfig(block_m, 128, 128, split_k, num_warps=8, num_stages=3 if block_m <= 128 else 2,
                            swap_ab=True)
    return KernelConfig(64, 64, 128, dequant_first=True)


def _fit_group(config: KernelConfig, group_size: "int | None") -> KernelConfig:
    """Shrink BLOCK_K until it divides a group size of 128 or more (smaller groups are scaled inside a block)."""
    if group_size is None or group_size % config.block_k == 0 or group_size in SMALL_GROUPS:
        return config
    block_k = math.gcd(config.block_k, group_size)
    return KernelConfig(config.block_m, config.block_n, block_k, config.split_k, config.num_warps,
                        config.num_stages, config.use_dot, config.dequant_first, config.swap_ab)


def _shape_of(key: str) -> tuple:
    """(N, K) of a table's "NxK" key."""
    n, k = key.split("x")
    return int(n), int(k)


def log_distance(shape: tuple, n: int, k: int) -> float:
    """How far a measured (N, K) is from (n, k): |log(N / n)| + |log(K / k)| (a table's nearest entry serves a
    shape it has not seen)."""
    return abs(math.log(shape[0] / n)) + abs(math.log(shape[1] / k))


def choose_config(m: int, n: int, k: int, fmt: FPFormat, dtype: torch.dtype, group_size: "int | None",
                  device) -> KernelConfig:
    """The configuration for this case: the measured table entry when there is one (table_for says which table a
    format and dtype use), else heuristic_config."""
    return _choose(m, n, k, device_key(device), fmt.name, str(dtype).removeprefix("torch."), group_size,
                   torch.device(device))


@functools.lru_cache(maxsize=4096)
def _choose(m: int, n: int, k: int, key: str, fmt_name: str, dtype_name: str, group_size: "int | None",
            device: torch.device) -> KernelConfig:
    """choose_config for GPU ``key`` (each case decided once per process; KernelConfig is frozen)."""
    _, table = table_for(key, fmt_name, dtype_name)
    bucket = str(m_bucket(m))
    candidates = table.get(bucket, {})
    if candidates:
        best = min(candidates, key=lambda shape: log_distance(_shape_of(shape), n, k))
        entry = {name: value for name, value in candidates[best].items() if name not in ("us", "cuda")}
        entry["block_k"] = max(entry["block_k"], MIN_BLOCK_K)  # tables measured on layout 1 had 64-column blocks
        config = KernelConfig(**entry)
    else:
        config = heuristic_config(m, n, k, _num_sms(device))
    return _fit_group(config, group_size)


def config_to_dict(config: KernelConfig) -> dict:
    return asdict(config)


# ---------------------------------------------------------------------------------------------------------------
# The CUDA kernels (kernels/fpx_cuda.py) in the same tables: bench/tune.py adds to an entry "cuda": the fastest
# measured launch of the small-M kernel ({"split", "prefetch_x", "us"}, M <= 16, "cluster_split": true where
# the split's CTAs summed their partials in a cluster, "row_tiles": 2 where two tiles per warp shared x, "w_ahead"
# where other than 2 weight tiles were held in registers per warp) or of the
# mid-M kernel ({"kernel": "mid", "split", "row_tiles", "warps", "us"}, and "blocks" where fewer rows of x per CTA
# won) or of the wgmma kernel ({"kernel": "wgmma", "split", "n_x", "wgs", "x_ahead", "min_ctas", "us"}, and
# "producer": true where a warpgroup of its own copied x, "w_ahead" where other than 2 weight tiles were in
# flight, "interleave": true where its consumers de-quantized each k-step beside the wgmma before it, sm_90, M >= 8) for that shape. Other keys are ignored: tables written before the wgmma kernel's bulk path
# was taken out (2026-12-03) carry "cluster" in wgmma entries.


@dataclass(frozen=True)
class SmallM:
    split: int
    prefetch_x: bool
    us: float
    kernel: str = "small"  # "small" (fpx_small_m), "mid" (fpx_mid_m) or "wgmma" (fpx_wgmma)
    row_tiles: int = 1
    warps: int = 4
    blocks: int = 0  # mid: n8 blocks of x rows per CTA (0: as many as the kernel takes)
    n_x: int = 0  # wgmma: x rows per CTA (0: the kernel's default)
    wgs: int = 1  # wgmma: warpgroups per CTA
    x_ahead: int = 1  # wgmma: K tiles of x in flight
    min_ctas: int = 1  # wgmma: resident CTAs per SM the registers must allow
    cluster_split: bool = False  # small: the split's CTAs of a row block a cluster summing in shared memory
    producer: bool = False  # wgmma: a producer warpgroup copies x into an mbarrier ring (warp specialization)
    w_ahead: int = 2  # small, wgmma: K tiles of weights in register buffers per warp
    interleave: bool = False  # wgmma (producer): each k-step de-quantized beside the wgmma of the ones before it


def _launch(cuda: dict) -> SmallM:
    """A table entry's "cuda" field as a SmallM launch."""
    kernel = str(cuda.get("kernel", "small"))
    if kernel not in ("small", "mid", "wgmma"):
        raise ValueError(f"unknown CUDA kernel {kernel!r} in a kernel table (known: small, mid, wgmma)")
    return SmallM(int(cuda["split"]), bool(cuda.get("prefetch_x", True)), float(cuda["us"]), kernel,
                  int(cuda.get("row_tiles", 1)), int(cuda.get("warps", 4)), int(cuda.get("blocks", 0)),
                  int(cuda.get("n_x", 0)), int(cuda.get("wgs", 1)), int(cuda.get("x_ahead", 1)),
                  int(cuda.get("min_ctas", 1)), bool(cuda.get("cluster_split", False)),
                  bool(cuda.get("producer", False)), int(cuda.get("w_ahead", 2)),
                  bool(cuda.get("interleave", False)))


@functools.lru_cache(maxsize=4096)
def _small_m_entries(key: str, fmt_name: str, dtype_name: str, bucket: int) -> dict:
    """{(n, k): (triton us, SmallM)} of one M bucket's entries that measured a CUDA kernel."""
    _, table = table_for(key, fmt_name, dtype_name)
    found = {}
    for shape, entry in table.get(str(bucket), {}).items():
        if isinstance(entry.get("cuda"), dict):
            found[_shape_of(shape)] = (float(entry.get("us", math.inf)), _launch(entry["cuda"]))
    return found


def _small_m_entries_for(m: int, fmt: FPFormat, dtype: torch.dtype, device) -> dict:
    """_small_m_entries of this case's table and M bucket on ``device``'s GPU."""
    return _small_m_entries(device_key(device), fmt.name, str(dtype).removeprefix("torch."), m_bucket(m))


def measured_small_m(m: int, n: int, k: int, fmt: FPFormat, dtype: torch.dtype, device) -> "SmallM | None":
    """The fastest measured CUDA launch for exactly this shape, M bucket, format table and dtype on this GPU; None
    when the table has none (the kernel's model then picks)."""
    found = _small_m_entries_for(m, fmt, dtype, device).get((n, k))
    return found[1] if found is not None else None


SMALL_M_MAX = 16  # the small-M kernel's rows (fpx_cuda.MAX_M is this)


def small_m_backend(m: int, n: int, k: int, fmt: FPFormat, dtype: torch.dtype, device) -> str:
    """"cuda" (the small-M kernel), "mid" (the CUDA mid-M kernel), "wgmma" (the CUDA wgmma kernel, sm_90) or
    "triton" for a case the CUDA kernels take: the fastest measured on the nearest shape (by log-distance of N and K)
    of this M bucket. Without a measurement: "cuda" at M <= 16 (it measured faster at M <= 8 on the H100 and the
    H200), "triton" above (the mid-M and wgmma kernels run only where a table measured them faster)."""
    return _backend(device_key(device), fmt.name, str(dtype).removeprefix("torch."), m_bucket(m), n, k)


@functools.lru_cache(maxsize=4096)
def _backend(key: str, fmt_name: str, dtype_name: str, m: int, n: int, k: int) -> str:
    """small_m_backend of GPU ``key``'s table at M bucket m (each case decided once per process)."""
    entries = _small_m_entries(key, fmt_name, dtype_name, m)
    if not entries:
        return "cuda" if m <= SMALL_M_MAX else "triton"
    nearest = min(entries, key=lambda shape: log_distance(shape, n, k))
    triton_us, cuda = entries[nearest]
    if cuda.us > triton_us:
        return "triton"
    if cuda.kernel in ("mid", "wgmma"):
        return cuda.kernel
    return "cuda" if m <= SMALL_M_MAX else "triton"
