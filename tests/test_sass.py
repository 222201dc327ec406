"""Machine code for sm_90a, compiled on the CPU (in a subprocess: the tests' Triton runs interpreted): every dispatch
configuration of the Triton kernel compiles (what the interpreter cannot check), the CUDA small-M kernel compiles
through NVRTC for every kernel format, and the main loops stay inside their per-pipe budgets (bench/sass.py;
docs/kernel-notes.md has the figures)."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from fp6llm.formats import FPFormat  # noqa: E402
from fp6llm.kernels import fpx_cuda  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
E3M2 = FPFormat.parse("e3m2")
COMPILE_ALL = """
import sys
sys.path.insert(0, {bench!r})
import sass
import tune
from pathlib import Path
from fp6llm.formats import FPFormat
from fp6llm.kernels.dispatch import M_BUCKETS, MIN_BLOCK_K, KernelConfig, _load_tables, heuristic_config
configs = set()
for path in sorted((Path({configs!r})).glob("*.json")):
    for shapes in (shapes for table in _load_tables(path.stem).values() for shapes in table.values()):
        for entry in shapes.values():
            entry = {{key: value for key, value in entry.items() if key not in ("us", "cuda")}}
            entry["block_k"] = max(entry["block_k"], MIN_BLOCK_K)
            configs.add(KernelConfig(**entry))
for m in M_BUCKETS:
    for n, k in ((1024, 8192), (8192, 8192), (57344, 8192)):
        configs.add(heuristic_config(m, n, k, 132))
    configs.update(tune.candidates(m))  # what bench/tune.py times on the device must compile too
fused = sorted((c for c in configs if not c.dequant_first), key=str)
for config in fused:
    assert sass.triton_cubin(FPFormat.parse("e3m2"), "float16", config), config
assert sass.triton_cubin(FPFormat.parse("e3m2"), "bfloat16", heuristic_config(1, 8192, 8192, 132))
print(len(fused))
"""


def compiled_env() -> dict:
    return {**os.environ, "TRITON_INTERPRET": "0"}


def nvrtc_available() -> bool:
    try:
        fpx_cuda._find_nvrtc()
        return True
    except RuntimeError:
        return False


def counts(kernel: str, tmp_path, *args) -> dict:
    out = tmp_path / f"{kernel}.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "sass.py"), "--kernel", kernel, "--json", str(out), *args],
                   check=True, env=compiled_env(), capture_output=True, text=True, timeout=600)
    return json.loads(out.read_text())[kernel]


@pytest.mark.slow
def test_every_dispatch_configuration_compiles_for_sm90a():
    code = COMPILE_ALL.format(bench=str(ROOT / "bench"), configs=str(Path(fpx_cuda.__file__).parent / "configs"))
    result = subprocess.run([sys.executable, "-c", code], env=compiled_env(), capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) >= 10


def test_triton_small_m_loop_budget(tmp_path):
    """Layout v2 in Triton: <= 2.6 ALU lane-ops per weight (v1: 3.3-3.45) for the default small-M configuration; its
    imad_rotate variant (field moves as multiplies): <= 2.2 ALU (built: 2.09), the moves on the FMA pipe."""
    triton = counts("triton", tmp_path)
    assert triton["per_weight"]["alu"] <= 2.6 and triton["per_weight"]["mma"] > 0
    multiplied = counts("triton", tmp_path, "--imad-rotate")
    assert multiplied["per_weight"]["alu"] <= 2.2
    assert multiplied["per_weight"]["fma"] >= triton["per_weight"]["fma"] + 0.5  # where the moves went


@pytest.mark.skipif(not nvrtc_available(), reason="NVRTC not installed (the test extra installs nvidia-cuda-nvrtc)")
def test_cuda_small_m_kernel_compiles_and_fits_the_budget(tmp_path, monkeypatch):
    """The CUDA kernel for M <= 8, e3m2, FP16: <= 1.5 ALU and <= 2.3 issued lane-ops per weight (built: 1.47, 2.16);
    every kernel format and both dtypes compile through NVRTC (in parallel, into an empty cache)."""
    cuda = counts("cuda", tmp_path)
    assert cuda["per_weight"]["alu"] <= 1.5
    assert cuda["issued"] <= 2.3
    assert cuda["ops"]["HMMA"] == 16  # 8 k-steps x 2 tiles, one n8 block
    monkeypatch.setenv("FP6LLM_CACHE_DIR", str(tmp_path / "cache"))
    sources = [fpx_cuda.kernel_source(FPFormat.parse(name), bf16, 2, True, **variant)
               for name in ("e2m3", "e2m2", "e2m1", "e3m1", "e4m3", "e2m4") for bf16 in (False, True)
               for variant in ({}, {"fma_shifts": True}, {"prefetch_x": False})]
    fpx_cuda.precompile(sources, "sm_90a", fpx_cuda.KERNEL_NAME, workers=os.cpu_count() or 1)
    assert len(list((tmp_path / "cache" / "cuda").iterdir())) == len(set(sources)) == 36


@pytest.mark.skipif(not nvrtc_available(), reason="NVRTC not installed (the test extra installs nvidia-cuda-nvrtc)")
def test_cuda_fma_shifts_variant_fits_the_alu_budget(tmp_path):
    """The fma_shifts variant (left shifts by kernel-parameter multipliers, which ptxas cannot turn into SHF):
    e3m2, FP16, M <= 8: <= 1.2 ALU lane-ops per weight (built: 1.09) at <= 96 registers (5 CTAs of 4 warps per SM,
    as the immediate variant's 91), and the multipliers it takes are exactly its left shifts."""
    cuda = counts("cuda", tmp_path, "--fma-shifts")
    assert cuda["per_weight"]["alu"] <= 1.2 and cuda["issued"] <= 2.3
    assert cuda["ops"].get("SHF", 0) <= 8  # the left shifts left the ALU pipe
    assert cuda["registers"] <= 96
    assert fpx_cuda.shifts(E3M2) == (2, 4, 6, 8)
    source = fpx_cuda.kernel_source(E3M2, False, 1, False, fma_shifts=True)
    assert "POWER_PARAMS , u32 pw_2, u32 pw_4, u32 pw_6, u32 pw_8" in source and "shl_fma<" not in source


@pytest.mark.slow
@pytest.mark.skipif(not nvrtc_available(), reason="NVRTC not installed (the test extra installs nvidia-cuda-nvrtc)")
def test_cuda_mid_m_kernel_compiles_and_fits_the_budget(tmp_path, monkeypatch):
    """The mid-M kernel, e3m2, FP16, M = 32, two row tiles per warp: <= 1.8 ALU and <= 3.5 issued lane-ops per
    weight (built: 1.66, 3.27), 8 k-steps x 2 K tiles x 2 row tiles x 4 n8 blocks of MMAs, no spills; it compiles
    at the extreme launch shapes tune times at 64 rows of x, and for every kernel format and both dtypes, with at
    most a few bytes of stack (ptxas keeps e4m3 at 8 warps to 128 registers with one 8-byte spill)."""
    mid = counts("mid", tmp_path, "--m", "32", "--row-tiles", "2")
    assert mid["per_weight"]["alu"] <= 1.8 and mid["issued"] <= 3.5
    assert mid["ops"]["HMMA"] == 8 * 2 * 2 * 4 and "STL" not in mid["ops"]
    assert mid["registers"] <= 200
    sys.path.insert(0, str(ROOT / "bench"))
    import sass
    import tune
    # e3m2 FP16 at the smallest and largest launch shapes tune times at 64 rows of x (the largest CTAs), then one
    # per other case: e3m2 FP16 at 16 rows, BF16 and the other formats at 33 (compile time: 1-13 s per variant)
    cases = [("e3m2", False, 64, tune.MID_SHAPES[0]), ("e3m2", False, 64, tune.MID_SHAPES[-1]),
             ("e3m2", False, 16, (1, 8)), ("e3m2", True, 33, (2, 8))]
    cases += [(name, False, 33, (1, 4)) for name in ("e2m3", "e2m1", "e4m3", "e2m4")]
    sources = [fpx_cuda.mid_kernel_source(FPFormat.parse(name), bf16, fpx_cuda.mid_blocks_m(m), row_tiles, warps,
                                          True) for name, bf16, m, (row_tiles, warps) in cases]
    monkeypatch.setenv("FP6LLM_CACHE_DIR", str(tmp_path / "cache"))  # compiled in parallel into an empty cache
    fpx_cuda.precompile(sources, "sm_90a", fpx_cuda.MID_KERNEL_NAME, workers=os.cpu_count() or 1)
    for (name, bf16, m, (row_tiles, warps)), source in zip(cases, sources):
        usage = sass._cuobjdump(fpx_cuda.cached_cubin(source, "sm_90a", fpx_cuda.MID_KERNEL_NAME),
                                "--dump-resource-usage")
        stack = int(re.search(r"STACK:(\d+)", usage).group(1))
        assert "LOCAL:0" in usage and stack <= 16, (name, bf16, m, row_tiles, warps, usage)


@pytest.mark.skipif(not nvrtc_available(), reason="NVRTC not installed (the test extra installs nvidia-cuda-nvrtc)")
def test_precompile_fills_the_disk_cache_in_parallel(tmp_path, monkeypatch):
    """fpx_cuda.precompile: each source compiled once, in worker processes, into the cache the launches load from
    (cached_cubin then returns the stored cubin); a second call compiles nothing."""
    monkeypatch.setenv("FP6LLM_CACHE_DIR", str(tmp_path))
    sources = [fpx_cuda.kernel_source(FPFormat.parse("e3m2"), False, 1, bias) for bias in (False, True)]
    fpx_cuda.precompile(sources + sources[:1], "sm_90a", "fpx_small_m", workers=2)
    cached = sorted((tmp_path / "cuda").iterdir())
    assert len(cached) == 2 and all(path.stat().st_size > 1000 for path in cached)
    stamps = [path.stat().st_mtime_ns for path in cached]
    fpx_cuda.precompile(sources, "sm_90a", "fpx_small_m", workers=2)
    assert [path.stat().st_mtime_ns for path in cached] == stamps
    assert {fpx_cuda.cached_cubin(source, "sm_90a", "fpx_small_m") for source in sources} == \
        {path.read_bytes() for path in cached}


@pytest.mark.skipif(not nvrtc_available(), reason="NVRTC not installed (the test extra installs nvidia-cuda-nvrtc)")
def test_cuda_small_m_pdl_touches_nothing_but_weights_before_its_wait():
    """The small-M kernel's PDL variants for sm_90a: in program order, nothing reads or writes memory before the
    grid-dependency wait (ACQBULK) but, with early_weights, the first weight tile's loads (one LDG per load of
    LOAD_PLANES; ptxas keeps them there because the wait depends on their words); the trigger for the next grid
    (PREEXIT) comes after it; the K loop is the plain kernel's (about the same instruction count), at M <= 8 with
    x prefetched and at M <= 16 without."""
    sys.path.insert(0, str(ROOT / "bench"))
    import sass
    memory = ("LDG", "STG", "LD", "ST", "LDS", "STS", "ATOM", "ATOMG", "RED", "LDGSTS", "UBLKCP", "UBLKPF")
    for n_blocks_m, prefetch_x in ((1, True), (2, False)):
        sources = [fpx_cuda.kernel_source(FPFormat.parse("e3m2"), False, n_blocks_m, True, prefetch_x=prefetch_x,
                                          pdl=pdl, early_weights=early)
                   for pdl, early in ((False, False), (True, False), (True, True))]
        cubins = [fpx_cuda.nvrtc_compile(source, "sm_90a", "fpx_small_m.cu") for source in sources]
        plane_loads = next(line for line in sources[2].splitlines()
                           if line.startswith("#define LOAD_PLANES")).count("load_stream")
        for cubin, early in ((cubins[1], False), (cubins[2], True)):
            ops = [op for _, op, _, _ in sass.disassemble(cubin)]
            wait = ops.index("ACQBULK")
            assert ops.count("ACQBULK") == (2 if early else 1) and ops.index("PREEXIT") > wait
            before = [op for op in ops[:wait] if op in memory]
            assert before == (["LDG"] * plane_loads if early else []), (n_blocks_m, early, before)
        plain, *pdl = (len(sass.innermost_loop(sass.disassemble(c))) for c in cubins)
        assert all(abs(plain - p) <= 24 for p in pdl), (n_blocks_m, plain, pdl)


@pytest.mark.skipif(not nvrtc_available(), reason="NVRTC not installed (the test extra installs nvidia-cuda-nvrtc)")
def test_cuda_small_m_two_row_tiles_share_each_load_of_x():
    """row_tiles=2 for sm_90a (M <= 8 and M <= 16, x at compute time): no local memory, registers for at least 6 CTAs
    of 2 warps per SM, and per loop pass (2 K tiles) the loads of 4 weight tiles but of x only twice: LOAD_PLANES'
    loads per tile x 4 + 4 n8-block loads of x x 2; the one-tile kernel loads x once per weight tile."""
    sys.path.insert(0, str(ROOT / "bench"))
    import sass
    for n_blocks_m in (1, 2):
        source = fpx_cuda.kernel_source(FPFormat.parse("e3m2"), False, n_blocks_m, False, prefetch_x=False,
                                        row_tiles=2)
        cubin = fpx_cuda.nvrtc_compile(source, "sm_90a", "fpx_small_m.cu")
        usage = sass._cuobjdump(cubin, "--dump-resource-usage")
        assert "LOCAL:0" in usage and "STACK:0" in usage, usage  # no local arrays, no spills
        assert sass.registers(cubin) * 64 * 6 <= 65536
        plane_loads = next(line for line in source.splitlines()
                           if line.startswith("#define LOAD_PLANES")).count("load_stream")
        loop = [op for _, op, _, _ in sass.innermost_loop(sass.disassemble(cubin))]
        assert loop.count("LDG") == 4 * plane_loads + 2 * 4 * n_blocks_m, (n_blocks_m, loop.count("LDG"))
        assert loop.count("HMMA") == 4 * 8 * n_blocks_m
    with pytest.raises(ValueError, match="row tiles"):
        fpx_cuda.kernel_source(FPFormat.parse("e3m2"), False, 1, False, prefetch_x=True, row_tiles=2)


@pytest.mark.skipif(not nvrtc_available(), reason="NVRTC not installed (the test extra installs nvidia-cuda-nvrtc)")
def test_cuda_small_m_weight_rings_compile_without_spills():
    """w_ahead 3 and 4 (a ring of weight tiles in registers) for sm_90a, as the tuner times them (PDL with the early
    first tile, M <= 8 and M <= 16, x a tile ahead or not, summed in a cluster, two row tiles per warp; FP16, and
    BF16 at M <= 16 with x ahead, the most registers): no local memory or spills; a loop pass is w_ahead K tiles,
    each tile's plane loads and 8 k-steps of MMAs per n8 block and row tile, x loaded once per tile; before the
    grid-dependency wait the loads of the first w_ahead - 1 weight tiles and nothing else; w_ahead 2 is the
    ping-pong's source, unchanged."""
    sys.path.insert(0, str(ROOT / "bench"))
    import sass
    e3m2 = FPFormat.parse("e3m2")
    cases = [(w, n_blocks_m, prefetch_x, False, 0, 1) for w in (3, 4) for n_blocks_m in (1, 2)
             for prefetch_x in (True, False)]
    # BF16; summed in a cluster; two row tiles per warp
    cases += [(4, 2, True, True, 0, 1), (3, 1, True, False, 8, 1), (4, 1, True, False, 4, 1),
              (3, 2, False, False, 0, 2), (4, 2, False, False, 0, 2)]
    sources = [fpx_cuda.kernel_source(e3m2, bf16, n_blocks_m, False, prefetch_x=prefetch_x, pdl=True,
                                      early_weights=True, w_ahead=w, cluster_split=cluster, row_tiles=row_tiles)
               for w, n_blocks_m, prefetch_x, bf16, cluster, row_tiles in cases]
    plane_loads = next(line for line in sources[0].splitlines()
                       if line.startswith("#define LOAD_PLANES")).count("load_stream")
    for (w, n_blocks_m, prefetch_x, bf16, _, row_tiles), source in zip(cases, sources):
        cubin = fpx_cuda.nvrtc_compile(source, "sm_90a", "fpx_small_m.cu")
        usage = sass._cuobjdump(cubin, "--dump-resource-usage")
        assert "LOCAL:0" in usage and "STACK:0" in usage, (w, n_blocks_m, prefetch_x, bf16, usage)
        instructions = sass.disassemble(cubin)
        loop = [op for _, op, _, _ in sass.innermost_loop(instructions)]
        assert loop.count("HMMA") == w * row_tiles * 8 * n_blocks_m, (w, n_blocks_m, prefetch_x, loop.count("HMMA"))
        assert loop.count("LDG") == w * (row_tiles * plane_loads + 4 * n_blocks_m), (w, n_blocks_m, prefetch_x,
                                                                                     row_tiles, loop.count("LDG"))
        ops = [op for _, op, _, _ in instructions]  # the first w - 1 tiles' weights, and nothing else, before the wait
        before = [op for op in ops[:ops.index("ACQBULK")] if op in ("LDG", "STG", "LD", "ST", "LDS", "STS", "ATOMG")]
        assert before == ["LDG"] * (w - 1) * row_tiles * plane_loads, (w, n_blocks_m, prefetch_x, before)
    assert fpx_cuda.kernel_source(e3m2, False, 1, False, w_ahead=2) == fpx_cuda.kernel_source(e3m2, False, 1, False)
    assert "W_AHEAD" not in fpx_cuda.kernel_source(e3m2, False, 1, False).split("// TC-FPx small-M")[0]
    with pytest.raises(ValueError, match="2 to 4 weight tiles"):
        fpx_cuda.kernel_source(e3m2, False, 1, False, w_ahead=5)


@pytest.mark.skipif(not nvrtc_available(), reason="NVRTC not installed (the test extra installs nvidia-cuda-nvrtc)")
def test_cuda_small_m_cluster_split_compiles():
    """The small-M kernel's split-K in a cluster for sm_90a (M <= 8 at 8 CTAs per cluster, M <= 16 at 2, with
    bias): no local memory, the two cluster barriers, the loads of the other CTAs' partials, no global atomics."""
    sys.path.insert(0, str(ROOT / "bench"))
    import sass
    for n_blocks_m, split in ((1, 8), (2, 2)):
        source = fpx_cuda.kernel_source(FPFormat.parse("e3m2"), False, n_blocks_m, True, cluster_split=split)
        cubin = fpx_cuda.nvrtc_compile(source, "sm_90a", "fpx_small_m.cu")
        usage = sass._cuobjdump(cubin, "--dump-resource-usage")
        assert "LOCAL:0" in usage and "STACK:0" in usage, usage  # no local arrays, no spills
        ops = [op for _, op, _, _ in sass.disassemble(cubin)]
        assert ops.count("UCGABAR_ARV") == 2 and ops.count("UCGABAR_WAIT") == 2, split
        assert "LD" in ops and not any(op.startswith("ATOM") or op.startswith("RED") for op in ops)


@pytest.mark.skipif(not nvrtc_available(), reason="NVRTC not installed (the test extra installs nvidia-cuda-nvrtc)")
def test_cuda_wgmma_kernel_compiles_without_serialized_wgmma():
    """The wgmma kernel for sm_90a at the default launches of 64 and 128 rows of x (FP16, BF16), a 24-row,
    two-warpgroup, biased e2m1 launch and a four-warpgroup one: no local memory, within the registers of its CTAs
    per SM, 8 HGMMA per K tile of a loop pass (as many K tiles as weight tiles in flight: 2, and 3 or 4 where
    asked), and ptxas did not serialize the wgmma (C7513: an input
    register of a wgmma written inside its pipeline stage; C7519: a wgmma in a path it thinks divergent); also the
    warp-specialized variants (a producer warpgroup: its threads count against the registers); and no instruction
    writes an A register of a wgmma batch before the wait for it (sass.wgmma_register_hazards: a variant that
    de-quantized the next tile beside the wgmma, since taken out, had ptxas put it into the in-flight registers)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import sass
    cases = [("e3m2", False, 64, 1, 1, 4, False, False), ("e3m2", True, 128, 1, 1, 3, False, False),
             ("e2m1", False, 24, 2, 2, 1, True, False), ("e3m2", False, 64, 4, 1, 1, False, False),
             # the warp-specialized kernel (a producer warpgroup beside one or two consumers)
             ("e3m2", False, 128, 2, 3, 1, False, True), ("e3m2", True, 128, 2, 4, 1, True, True),
             ("e2m3", False, 64, 1, 5, 1, False, True)]
    # four and three weight tiles in flight per warp, at the launches the tuner times them
    cases = [case + (2,) for case in cases] + [("e3m2", False, 16, 1, 2, 3, False, False, 4),
                                               ("e3m2", True, 64, 1, 2, 3, True, False, 4),
                                               ("e2m1", False, 32, 1, 2, 3, False, False, 3),
                                               ("e3m2", False, 40, 2, 3, 1, False, True, 4),
                                               # three consumers, the producer's registers handed over (setmaxnreg)
                                               ("e3m2", False, 128, 3, 2, 1, False, True, 2),
                                               ("e3m2", True, 128, 3, 4, 1, True, True, 2)]
    # interleaved (a k-step's de-quantization beside the wgmma of the k-steps before it): plain and beside a producer
    cases = [case + (False,) for case in cases] + [("e3m2", False, 64, 1, 2, 3, False, False, 2, True),
                                                   ("e3m2", True, 128, 2, 1, 1, True, False, 2, True),
                                                   ("e2m1", False, 32, 4, 1, 1, False, False, 2, True),
                                                   ("e3m2", False, 128, 2, 2, 1, False, True, 2, True),
                                                   ("e3m2", True, 128, 2, 3, 1, True, True, 2, True),
                                                   ("e3m2", False, 128, 3, 2, 1, False, True, 2, True),
                                                   ("e2m1", False, 256, 1, 2, 1, False, True, 2, True),
                                                   ("e2m3", False, 64, 2, 5, 1, False, True, 3, True),
                                                   # two consumers on 256 rows of x (setmaxnreg: 168 -> 40 / 232)
                                                   ("e3m2", False, 256, 2, 2, 1, False, True, 2, False),
                                                   ("e3m2", True, 256, 2, 2, 1, True, True, 2, True)]
    for name, bf16, n_x, wgs, x_ahead, min_ctas, bias, producer, w_ahead, interleave in cases:
        source = fpx_cuda.wgmma_kernel_source(FPFormat.parse(name), bf16, n_x, bias, wgs, x_ahead, min_ctas, False,
                                              producer, w_ahead, interleave)
        log = []
        cubin = fpx_cuda.nvrtc_compile(source, "sm_90a", "fpx_wgmma.cu", log, ("--ptxas-options=-v",))
        assert "C75" not in log[0] and "serialized" not in log[0], log[0]  # C7513, C7519 (a divergent path)
        usage = sass._cuobjdump(cubin, "--dump-resource-usage")
        hand_off = fpx_cuda.wgmma_hand_off(n_x, wgs, producer)
        # no local arrays; no spills (STACK), but for a hand-off's epilogue, which runs at the launch's registers
        assert "LOCAL:0" in usage and ("STACK:0" in usage or hand_off), usage
        assert sass.registers(cubin) * 128 * (wgs + producer) * min_ctas <= 65536
        assert sass.wgmma_register_hazards(sass.disassemble(cubin)) == []
        loop = sass.innermost_loop(sass.disassemble(cubin))
        assert sass.wgmma_register_hazards(loop + loop) == []  # across the back edge too
        assert sum(op == "HGMMA" for _, op, _, _ in loop) == 8 * w_ahead
        # one wait a tile (for all 8), or, interleaved, one before each k-step's de-quantization (7 left in flight)
        waits = [args.strip() for _, op, mods, args in loop if op == "WARPGROUP" and ".DEPBAR" in mods]
        assert waits == (["gsb0, 0x7"] * 8 * w_ahead if interleave else ["gsb0, 0x0"] * w_ahead), (n_x, waits)
        assert not any(op in ("STL", "LDL") for _, op, _, _ in loop), (n_x, wgs, producer)  # no spills in the loop
        if hand_off:  # the setmaxnreg hand-off: launched at exactly its registers (three consumers: 128; 32 for the
            # producer, 160 for the consumers, 128 again for all)
            launch_regs, producer_regs, consumer_regs = hand_off
            assert sass.registers(cubin) == launch_regs
            hands = [int(args.split(",")[-1], 16) for _, op, _, args in sass.disassemble(cubin) if op == "USETMAXREG"]
            assert sorted(hands) == sorted([producer_regs, launch_regs, launch_regs, consumer_regs]), hands


def test_wgmma_register_hazards_finds_a_write_to_in_flight_a_registers():
    """The checker on hand-made instruction lists: a write to an in-flight batch's A register (also through the
    upper half of a 64-bit write) is found; after the wait, to other registers, or by a store it is not; a partial
    wait (DEPBAR.LE gsb0, N) frees the registers of all but the newest N commit groups."""
    sys.path.insert(0, str(ROOT / "bench"))
    import sass
    batch = [(0, "HGMMA", ".64x40x16.F32", "R24, R44, gdesc[UR8], R24 "),
             (16, "HGMMA", ".64x40x16.F32", "R24, R48, gdesc[UR12], R24, gsb0 ")]
    wait = [(64, "WARPGROUP", ".DEPBAR.LE", "gsb0, 0x0 ")]
    assert sass.wgmma_register_hazards(batch + [(32, "LOP3", ".LUT", "R46, R1, R2, RZ, 0xc0, !PT ")] + wait) \
        == [(32, "LOP3.LUT", "R46, R1, R2, RZ, 0xc0, !PT ")]
    assert len(sass.wgmma_register_hazards(batch + [(32, "IMAD", ".WIDE.U32", "R43, R13, 0x1000, RZ ")])) == 1
    assert sass.wgmma_register_hazards(batch + [(32, "IMAD", ".WIDE.U32", "R52, R13, 0x1000, RZ "),
                                                (40, "STS", ".128", "[R44], R4 ")] + wait
                                       + [(80, "LOP3", ".LUT", "R46, R1, R2, RZ, 0xc0, !PT ")]) == []
    # commit groups, one k-step each (the interleaved loop): a wait that leaves one group in flight frees the older
    # group's registers only
    steps = [(0, "HGMMA", ".64x128x16.F32", "R24, R88, gdesc[UR12], R24, gsb0 "),
             (16, "HGMMA", ".64x128x16.F32", "R24, R92, gdesc[UR16], R24, gsb0 "),
             (32, "WARPGROUP", ".DEPBAR.LE", "gsb0, 0x1 ")]
    assert sass.wgmma_register_hazards(steps + [(48, "LOP3", ".LUT", "R89, R1, R2, RZ, 0xc0, !PT ")]) == []
    assert sass.wgmma_register_hazards(steps + [(48, "LOP3", ".LUT", "R93, R1, R2, RZ, 0xc0, !PT ")]) \
        == [(48, "LOP3.LUT", "R93, R1, R2, RZ, 0xc0, !PT ")]


def test_cuda_kernel_refuses_what_it_does_not_handle():
    x = torch.zeros(4, 256, dtype=torch.float16)  # on the CPU: never the CUDA kernel
    assert not fpx_cuda.supports(E3M2, None, x, 64, 256)
    split = fpx_cuda.choose_split(8192, 8192, 1, 132)  # 128 row blocks alone leave the SMs a CTA each
    assert split > 1 and 128 * split <= 132 * 6  # ... and one wave of 6 resident CTAs per SM, not 1.3 waves


def test_cuda_split_model_is_near_the_measured_best():
    """choose_split against the H200's split sweeps of the small-M kernel (every shape x M of bench/tune.py, 11
    splits each, x a tile ahead), at the CTAs per SM the kernel runs (5 at M <= 8, 4 above): the model's split
    costs <= 1.02x the measured best in geo-mean and <= 1.10x on every case (fitted SUM_COST: 1.014x, 1.085x)."""
    log = ROOT / "bench" / "results" / "tune-h200-2026-12-02" / "tune-small-cuda.log"
    ratios = []
    for line in log.read_text().splitlines():
        found = re.match(r"\s+cuda M=(\d+) (\d+)x(\d+): (.*)", line)
        if not found:
            continue
        m, n, k = map(int, found.groups()[:3])
        times = {int(s): float(t) for t, s in re.findall(r"([\d.]+)us s(\d+)(?:,|$)", found.group(4))}
        split = fpx_cuda.choose_split(n, k, m, 132, resident=5 if m <= 8 else 4)
        ratios.append(times[min(times, key=lambda s: abs(s - split))] / min(times.values()))
    assert len(ratios) >= 40
    assert math.exp(sum(map(math.log, ratios)) / len(ratios)) <= 1.02 and max(ratios) <= 1.10


def test_cuda_sources_are_package_data():
    """A wheel (not an editable install) must carry the CUDA sources that fpx_cuda compiles at run time."""
    import tomllib
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["fp6llm"]
    package = Path(fpx_cuda.__file__).parent.parent
    shipped = {path for pattern in data for path in package.glob(pattern)}
    for source in (fpx_cuda.SOURCE, fpx_cuda.MID_SOURCE, fpx_cuda.WGMMA_SOURCE, fpx_cuda.COMMON):
        assert source in shipped, source


@pytest.mark.skipif(not nvrtc_available(), reason="NVRTC not installed (the test extra installs nvidia-cuda-nvrtc)")
def test_wgmma_ablations_skip_only_what_they_say():
    """bench/wgmma_ablate.py's variants for sm_90a: ABLATE 1 (no de-quantization) keeps the weight loads and the
    wgmma; ABLATE 2 (no wgmma) keeps the weight loads and the de-quantization (an empty asm sink of A had let ptxas
    drop both, so its timings measured neither)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import sass
    counts = {}
    try:
        for ablate in (1, 2):
            fpx_cuda.WGMMA_EXTRA_DEFINES[:] = [f"#define ABLATE {ablate}"]
            source = fpx_cuda.wgmma_kernel_source(FPFormat.parse("e3m2"), False, 16, False, 1, 2, 3, True)
            loop = [op for _, op, _, _ in sass.innermost_loop(sass.disassemble(
                fpx_cuda.nvrtc_compile(source, "sm_90a", "fpx_wgmma.cu")))]
            counts[ablate] = {op: loop.count(op) for op in ("LDG", "LOP3", "HGMMA")}
    finally:
        fpx_cuda.WGMMA_EXTRA_DEFINES[:] = []
    assert counts[1]["LDG"] > 0 and counts[1]["LOP3"] == 0 and counts[1]["HGMMA"] == 16, counts
    assert counts[2]["LDG"] > 0 and counts[2]["LOP3"] >= 128 and counts[2]["HGMMA"] == 0, counts
