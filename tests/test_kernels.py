"""TC-FPx kernel (kernels/fpx_gemm.py) against the float64 reference x @ dequantize(W).T (+ bias).

On a CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py) on small shapes; the
tests marked gpu run the compiled kernel, torch.compile(fullgraph=True) and CUDA-graph capture on a CUDA device.
Tolerance: relative Frobenius error < 4e-3 for fp16 outputs and < 2e-2 for bf16 (the output rounding of the
dtype, 2^-11 and 2^-8 relative, dominates; accumulation is float32).
The dispatch tests read a measured table written to a temporary directory (the test device's key is "cpu").
"""

import contextlib
import dataclasses
import functools
import itertools
import json
import os
import types

import pytest
import torch

triton = pytest.importorskip("triton")

from fp6llm import FPFormat, fpx_linear, quantize_weight  # noqa: E402
from fp6llm.kernels import dispatch  # noqa: E402
from fp6llm.kernels.dispatch import (M_BUCKETS, KernelConfig, choose_config, config_to_dict,  # noqa: E402
                                     heuristic_config)
from fp6llm.kernels.fpx_gemm import fpx_gemm, kernel_supports  # noqa: E402

TOLERANCE = {torch.float16: 4e-3, torch.bfloat16: 2e-2}
FORMATS = ["e3m2", "e2m3", "e2m2", "e3m1", "e2m1", "e4m3", "e1m2", "e2m4"]
CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if CUDA and not INTERPRETED else "cpu"
gpu = pytest.mark.skipif(not CUDA or INTERPRETED, reason="needs a CUDA device (compiled Triton)")
runs_kernel = pytest.mark.skipif(not CUDA and not INTERPRETED, reason="needs CUDA or TRITON_INTERPRET=1")


def run_case(gen, fmt, m, n, k, dtype, config, group_size=None, with_bias=False):
    w = torch.randn(n, k, generator=gen) * 0.05
    qw = quantize_weight(w, fmt, group_size).to(DEVICE)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    bias = torch.randn(n, generator=gen).to(DEVICE, dtype) if with_bias else None
    out = fpx_gemm(x, qw.planes, qw.scales, bias, qw.fmt, n, k, group_size, config)
    ref = x.double() @ qw.dequantize(torch.float64).T
    if bias is not None:
        ref = ref + bias.double()
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert out.shape == (m, n) and out.dtype == dtype
    assert err < TOLERANCE[dtype], f"{fmt} M={m} N={n} K={k} {dtype} {config}: rel err {err:.2e}"


# Every path: the reduction path (M = 1), the dot path with and without split-K, several row blocks.
PATHS = [
    KernelConfig(1, 32, 128, 1, use_dot=False),
    KernelConfig(1, 16, 128, 3, use_dot=False),
    KernelConfig(16, 32, 128, 1),
    KernelConfig(16, 32, 128, 4),
    KernelConfig(32, 16, 256, 2),
    KernelConfig(16, 32, 128, 2, swap_ab=True),
]


@runs_kernel
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_format_and_dtype(gen, fmt, dtype):
    run_case(gen, fmt, 3, 40, 300, dtype, KernelConfig(16, 32, 128, 2))


@runs_kernel
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("config", [KernelConfig(16, 32, 128, 2), KernelConfig(16, 32, 256, 1, swap_ab=True)],
                         ids=str)
def test_field_moves_by_multiply_give_the_same_bits(gen, fmt, config):
    """imad_rotate (fields moved by 32 x 32 -> 64-bit multiplies by 2^r, the table holding powers) computes exactly
    what the rotates do: the same outputs bit for bit, and the reference's within tolerance."""
    n, k = 40, 512
    qw = quantize_weight(torch.randn(n, k, generator=gen) * 0.05, fmt).to(DEVICE)
    x = torch.randn(5, k, generator=gen).to(DEVICE, torch.float16)
    rotated = fpx_gemm(x, qw.planes, qw.scales, None, qw.fmt, n, k, None, config, imad_rotate=False)
    multiplied = fpx_gemm(x, qw.planes, qw.scales, None, qw.fmt, n, k, None, config, imad_rotate=True)
    assert torch.equal(rotated, multiplied)
    ref = x.double() @ qw.dequantize(torch.float64).T
    assert ((multiplied.double() - ref).norm() / ref.norm()).item() < TOLERANCE[torch.float16]


@runs_kernel
@pytest.mark.parametrize("config", PATHS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_every_path_odd_shapes(gen, config, dtype, with_bias):
    m = 1 if not config.use_dot else 37  # odd M: several row blocks, the last one masked
    run_case(gen, "e3m2", m, 50, 200, dtype, config, with_bias=with_bias)  # N, K not multiples of the blocks


@runs_kernel
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("config", [KernelConfig(1, 32, 128, 2, use_dot=False), KernelConfig(16, 32, 128, 1),
                                    KernelConfig(16, 16, 256, 1, swap_ab=True)], ids=str)
def test_group_scales(gen, group_size, config):
    """Groups smaller than BLOCK_K scale the de-quantized tile; larger ones scale each block's partial sum."""
    run_case(gen, "e3m2", 5, 24, 512, torch.float16, config, group_size=group_size, with_bias=True)
    run_case(gen, "e2m1", 5, 24, 512, torch.bfloat16, config, group_size=group_size)


@runs_kernel
def test_smallest_codes_bf16_and_fp16():
    """Subnormal and smallest normal codes of every main format come out exactly (scale 1, x = identity rows)."""
    for fmt_name in ["e3m2", "e2m3", "e2m2", "e3m1", "e2m1"]:
        fmt = FPFormat.parse(fmt_name)
        k = 64
        from fp6llm.formats import value_table
        from fp6llm.packing import pack
        from fp6llm.quantize import QuantizedWeight
        small = torch.arange(fmt.num_codes, dtype=torch.uint8)[: k].repeat(k // min(k, fmt.num_codes) + 1)[:k]
        codes = small[None, :].repeat(16, 1)
        qw = QuantizedWeight(pack(codes, fmt), torch.ones(16), fmt, (16, k)).to(DEVICE)
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.eye(k, dtype=dtype, device=DEVICE)[:16]  # row i picks weight column i
            out = fpx_gemm(x, qw.planes, qw.scales, None, fmt, 16, k, None, KernelConfig(16, 16, 128, 1))
            expected = value_table(fmt)[codes[:, :16].long()].T.to(dtype)
            assert torch.equal(out.cpu(), expected), f"{fmt_name} {dtype}"


def test_dispatch_fits_every_group_size():
    """No table for "cpu": the rules, whose 128-wide blocks already fit these groups; a block never straddles a
    group of 128 or more."""
    shapes = [(n, k) for n in (1, 50, 4096, 57344) for k in (64, 200, 5120, 28672)]
    for m in list(M_BUCKETS) + [3, 17, 100, 5000]:
        for n, k in shapes:
            for group in (None, 32, 64, 128, 384):
                config = choose_config(m, n, k, FPFormat.parse("e3m2"), torch.float16, group, "cpu")
                assert config == heuristic_config(m, n, k, 132), (m, n, k, group, config)
                assert group is None or group < 128 or group % config.block_k == 0, (m, n, k, group, config)


# A measured table in kernels/configs/'s format: M bucket -> "NxK" -> the fastest configuration and its time.
TABLE_1 = KernelConfig(16, 128, 256, 3, num_warps=8, num_stages=2)
TABLE_4 = KernelConfig(32, 32, 512, 2, num_warps=2, num_stages=5, swap_ab=True)
TABLE_4_WIDE = KernelConfig(64, 256, 128, 1, num_warps=8, num_stages=3)
LAYOUT_1 = KernelConfig(1, 64, 128, 4, use_dot=False)  # stored with the 64-column blocks of layout 1 (below)


@pytest.fixture
def table(tmp_path, monkeypatch):
    """choose_config reading its tables from tmp_path, where cpu.json (the key of the test device) holds entries
    for the M buckets 1, 4 and 16 only; the real tables are read again afterwards."""
    layout_1 = dict(config_to_dict(LAYOUT_1), block_k=64, us=3.0)
    configs = {"1": {"4096x4096": dict(config_to_dict(TABLE_1), us=12.5)},
               "4": {"4096x4096": dict(config_to_dict(TABLE_4), us=14.0),
                     "57344x8192": dict(config_to_dict(TABLE_4_WIDE), us=190.0)},
               "16": {"1024x1024": layout_1}}
    (tmp_path / "cpu.json").write_text(json.dumps({"device": "cpu", "format": "e3m2", "dtype": "float16",
                                                   "configs": configs}))
    monkeypatch.setattr(dispatch, "CONFIG_DIR", tmp_path)
    clear_tables()
    yield
    clear_tables()


def clear_tables():
    dispatch._load_tables.cache_clear()
    dispatch.table_for.cache_clear()
    dispatch._small_m_entries.cache_clear()
    dispatch._backend.cache_clear()
    dispatch._choose.cache_clear()


@contextlib.contextmanager
def tables_file(tmp_path, monkeypatch, tables: dict):
    """dispatch reading ``tables`` ({"fmt/dtype": {bucket: {"NxK": entry}}}) as the test device's file in tmp_path;
    the real tables are read again afterwards."""
    (tmp_path / "cpu.json").write_text(json.dumps({"device": "cpu", "tables": tables}))
    monkeypatch.setattr(dispatch, "CONFIG_DIR", tmp_path)
    clear_tables()
    try:
        yield
    finally:
        clear_tables()


def table_entry(triton_us, cuda=None):
    """A table entry: the Triton launch TABLE_1 at triton_us, and the CUDA launch ``cuda`` if any."""
    return dict(config_to_dict(TABLE_1), us=triton_us, **({"cuda": cuda} if cuda else {}))


def choose(m, n, k, group_size=None, device="cpu"):
    return choose_config(m, n, k, FPFormat.parse("e3m2"), torch.float16, group_size, device)


def test_table_exact_hit_in_the_m_bucket_above(table):
    """M rounds up to its bucket: M = 1 reads bucket 1, M = 3 and 4 bucket 4, each the entry of its own shape."""
    assert choose(1, 4096, 4096) == TABLE_1
    assert choose(3, 4096, 4096) == choose(4, 4096, 4096) == TABLE_4
    assert choose(4, 57344, 8192) == TABLE_4_WIDE


def test_table_unseen_shape_takes_the_nearest_by_log_distance(table):
    """16000 x 8192 is nearer 57344 x 8192 than 4096 x 4096 in log N + log K (1.28 against 2.06), though not in
    plain N + K; small shapes go to the small entry."""
    assert choose(4, 16000, 8192) == TABLE_4_WIDE
    assert choose(4, 5000, 3000) == choose(4, 64, 200) == TABLE_4
    assert choose(1, 57344, 8192) == TABLE_1  # a bucket's only entry serves every shape


def test_table_layout_1_blocks_are_widened_to_a_packed_tile(table):
    assert choose(9, 1024, 1024) == LAYOUT_1


def fake_gpu_name(monkeypatch, name: str) -> None:
    """torch reports device 0, the current one, as ``name`` (dispatch reads a device's name once: a fresh cache for
    the test, the process's own back after it)."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(dispatch, "_device_key", functools.lru_cache(maxsize=None)(dispatch._device_key.__wrapped__))


def test_table_without_the_bucket_or_the_device_falls_back_to_the_rules(table, monkeypatch):
    for m, n, k in [(32, 4096, 4096), (100, 57344, 8192), (5000, 4096, 4096)]:  # buckets 32, 128, 4096: none
        assert choose(m, n, k) == heuristic_config(m, n, k, 132) not in (TABLE_1, TABLE_4, TABLE_4_WIDE)
    fake_gpu_name(monkeypatch, "NVIDIA Unmeasured GPU")
    monkeypatch.setattr(dispatch, "_num_sms", lambda device: 8)
    assert dispatch.device_key("cuda") == "unmeasured-gpu"
    assert choose(1, 4096, 4096, device="cuda") == heuristic_config(1, 4096, 4096, 8) != TABLE_1


def test_table_blocks_are_narrowed_to_divide_the_group(table):
    """A 512-wide measured block: kept for groups it divides and for 32 and 64 (scaled inside a block), narrowed
    to the largest power of two dividing a group of 128 or more."""
    for group, block_k in [(None, 512), (32, 512), (64, 512), (1024, 512), (256, 256), (384, 128), (640, 128)]:
        assert choose(4, 4096, 4096, group) == dataclasses.replace(TABLE_4, block_k=block_k), group


def test_each_format_and_dtype_takes_its_own_table_or_the_nearest(tmp_path, monkeypatch):
    """A file of several tables: a case uses its own (format, dtype) table; without one, a table of a format with
    the same plane widths and the same dtype (e2m3 -> e3m2, 4 + 2 bits), then one of the same dtype, then any."""
    e3m2_fp16, e2m1_fp16, e3m2_bf16 = TABLE_1, TABLE_4, TABLE_4_WIDE
    tables = {"e3m2/float16": {"1": {"4096x4096": config_to_dict(e3m2_fp16)}},
              "e2m1/float16": {"1": {"4096x4096": config_to_dict(e2m1_fp16)}},
              "e3m2/bfloat16": {"1": {"4096x4096": config_to_dict(e3m2_bf16)}}}
    with tables_file(tmp_path, monkeypatch, tables):
        def pick(fmt, dtype):
            return choose_config(1, 4096, 4096, FPFormat.parse(fmt), dtype, None, "cpu")
        assert pick("e3m2", torch.float16) == e3m2_fp16
        assert pick("e2m1", torch.float16) == e2m1_fp16  # its own, not e3m2's
        assert pick("e3m2", torch.bfloat16) == e3m2_bf16
        assert pick("e2m3", torch.float16) == e3m2_fp16  # same widths (4 + 2) as e3m2
        assert dispatch.table_for("cpu", "e2m2", "float16")[0] in {("e3m2", "float16"), ("e2m1", "float16")}
        assert dispatch.table_for("cpu", "e2m3", "bfloat16")[0] == ("e3m2", "bfloat16")


def test_small_m_kernel_choice_comes_from_the_cuda_entries(tmp_path, monkeypatch):
    """An M <= 16 entry's "cuda" (bench/tune.py): the backend is the faster of the two measured on the nearest shape
    of the bucket; the CUDA launch (split, prefetch_x) is used for exactly the measured shape only; no "cuda" entry:
    the CUDA kernel with its model; choose_config ignores the field."""
    tables = {"e3m2/float16": {
        "1": {"4096x4096": table_entry(12.0)},
        "8": {"4096x4096": table_entry(20.0, {"split": 3, "prefetch_x": False, "us": 12.5})},
        "16": {"4096x4096": table_entry(20.0, {"split": 2, "prefetch_x": True, "us": 25.0}),
               "57344x8192": table_entry(150.0, {"split": 4, "prefetch_x": True, "us": 120.0})}}}
    with tables_file(tmp_path, monkeypatch, tables):
        e3m2, fp16 = FPFormat.parse("e3m2"), torch.float16
        assert dispatch.small_m_backend(5, 4096, 4096, e3m2, fp16, "cpu") == "cuda"
        assert dispatch.measured_small_m(8, 4096, 4096, e3m2, fp16, "cpu") == dispatch.SmallM(3, False, 12.5)
        assert dispatch.small_m_backend(12, 4096, 4096, e3m2, fp16, "cpu") == "triton"  # 20 us < 25 us
        assert dispatch.small_m_backend(16, 5120, 5120, e3m2, fp16, "cpu") == "triton"  # nearest: 4096 x 4096
        assert dispatch.small_m_backend(16, 28672, 8192, e3m2, fp16, "cpu") == "cuda"  # nearest: 57344 x 8192
        assert dispatch.measured_small_m(16, 28672, 8192, e3m2, fp16, "cpu") is None  # not this shape: the model
        assert dispatch.measured_small_m(16, 57344, 8192, e3m2, fp16, "cpu") == dispatch.SmallM(4, True, 120.0)
        assert dispatch.small_m_backend(1, 4096, 4096, e3m2, fp16, "cpu") == "cuda"  # unmeasured
        assert dispatch.measured_small_m(1, 4096, 4096, e3m2, fp16, "cpu") is None
        assert choose_config(8, 4096, 4096, e3m2, fp16, None, "cpu") == TABLE_1


def test_mid_m_kernel_runs_only_where_a_table_measured_it_fastest(tmp_path, monkeypatch):
    """A "cuda" entry of kernel "mid" (bench/tune.py, M = 9..128): "mid" where it beat the Triton kernel on the
    nearest shape, "triton" where it lost or nothing was measured above M = 16; its launch (split, row tiles, warps)
    for exactly the measured shape; the small-M kernel ignores a "mid" launch; an unknown kernel is refused."""
    mid = {"kernel": "mid", "split": 2, "row_tiles": 2, "warps": 8, "us": 30.0}
    tables = {"e3m2/float16": {
        "16": {"8192x8192": table_entry(40.0, mid)},
        "32": {"8192x8192": table_entry(45.0, mid), "5120x5120": table_entry(20.0, dict(mid, us=25.0))}}}
    with tables_file(tmp_path, monkeypatch, tables):
        e3m2, fp16 = FPFormat.parse("e3m2"), torch.float16
        assert dispatch.small_m_backend(32, 8192, 8192, e3m2, fp16, "cpu") == "mid"
        assert dispatch.small_m_backend(20, 10240, 8192, e3m2, fp16, "cpu") == "mid"  # nearest: 8192 x 8192
        assert dispatch.small_m_backend(32, 5120, 5120, e3m2, fp16, "cpu") == "triton"  # 25 us > 20 us
        assert dispatch.small_m_backend(16, 8192, 8192, e3m2, fp16, "cpu") == "mid"
        assert dispatch.small_m_backend(64, 8192, 8192, e3m2, fp16, "cpu") == "triton"  # bucket 64 unmeasured
        assert dispatch.measured_small_m(32, 8192, 8192, e3m2, fp16, "cpu") == \
            dispatch.SmallM(2, True, 30.0, "mid", 2, 8)
        with pytest.raises(ValueError, match="unknown CUDA kernel 'wide'"):
            dispatch._launch({"kernel": "wide", "split": 1, "us": 1.0})


def test_wgmma_kernel_runs_only_where_a_table_measured_it_fastest(tmp_path, monkeypatch):
    """A "cuda" entry of kernel "wgmma" (bench/tune.py, M = 9..512): "wgmma" where it beat the Triton kernel on
    the nearest shape, "triton" where it lost; its launch (split, x rows per CTA, warpgroups, x tiles ahead, CTAs per
    SM) read back field by field; the "cluster" of tables written before the bulk path was taken out is ignored."""
    wgmma = {"kernel": "wgmma", "split": 2, "n_x": 128, "wgs": 1, "x_ahead": 2, "min_ctas": 3, "us": 50.0}
    assert dispatch._launch(dict(wgmma, cluster=0)) == dispatch._launch(wgmma)
    tables = {"e3m2/float16": {
        "256": {"8192x8192": table_entry(60.0, wgmma), "5120x5120": table_entry(20.0, dict(wgmma, us=25.0))}}}
    with tables_file(tmp_path, monkeypatch, tables):
        e3m2, fp16 = FPFormat.parse("e3m2"), torch.float16
        assert dispatch.small_m_backend(256, 8192, 8192, e3m2, fp16, "cpu") == "wgmma"
        assert dispatch.small_m_backend(200, 10240, 8192, e3m2, fp16, "cpu") == "wgmma"  # nearest: 8192 x 8192
        assert dispatch.small_m_backend(256, 5120, 5120, e3m2, fp16, "cpu") == "triton"  # 25 us > 20 us
        assert dispatch.small_m_backend(512, 8192, 8192, e3m2, fp16, "cpu") == "triton"  # bucket 512 unmeasured
        assert dispatch.measured_small_m(256, 8192, 8192, e3m2, fp16, "cpu") == \
            dispatch.SmallM(2, True, 50.0, "wgmma", n_x=128, wgs=1, x_ahead=2, min_ctas=3)


def test_small_m_launch_takes_given_fields_then_the_table_then_defaults():
    """A small-M launch: the caller's fields win, the table fills the others (not with a wgmma entry), and an explicit
    prefetch_x=True keeps one row tile even where the table measured two (the tuner's launches, 2026-12-04)."""
    from fp6llm.kernels import fpx_cuda
    two = dispatch.SmallM(4, False, 10.0, "small", row_tiles=2, cluster_split=True, w_ahead=3)
    assert fpx_cuda.small_m_launch(two, None, None, None, None) == (4, False, True, 2, 3)
    assert fpx_cuda.small_m_launch(two, 3, True, False, None, 2) == (3, True, False, 1, 2)
    assert fpx_cuda.small_m_launch(two, None, False, None, 1, 4) == (4, False, True, 1, 4)
    wgmma = dispatch.SmallM(2, True, 10.0, "wgmma", n_x=16, w_ahead=4)  # the wgmma entry's weight tiles: not taken
    assert fpx_cuda.small_m_launch(wgmma, None, None, None, None) == (None, True, False, 1, 2)
    assert fpx_cuda.small_m_launch(None, None, None, None, None) == (None, True, False, 1, 2)


def test_wgmma_table_launch_is_the_tables_whole_or_none_of_it():
    """fpx_wgmma's launch: the table's entry whole where the caller gives no shape field (its split overridable),
    else the caller's fields and the defaults, never the table's producer or weight tiles beside the caller's
    warpgroups (a tuner launch of one warpgroup at 4 CTAs per SM took the table's producer: a launch the kernel
    refuses, 2026-12-04); an entry of another kernel is ignored."""
    from fp6llm.kernels import fpx_cuda
    entry = dispatch.SmallM(3, True, 50.0, "wgmma", n_x=128, wgs=2, x_ahead=2, min_ctas=1, producer=True, w_ahead=3,
                            interleave=True)
    split, launch = fpx_cuda.wgmma_table_launch(entry, 256, None, None, None, None, None, None, None)
    assert split == 3 and launch == {"n_x": 128, "wgs": 2, "x_ahead": 2, "min_ctas": 1, "producer": True,
                                     "w_ahead": 3, "interleave": True}
    assert fpx_cuda.wgmma_table_launch(entry, 256, 1, None, None, None, None, None, None) == (1, launch)
    split, launch = fpx_cuda.wgmma_table_launch(entry, 256, 2, 64, 1, 1, 4, None, None)
    assert split == 2 and launch == {"n_x": 64, "wgs": 1, "x_ahead": 1, "min_ctas": 4, "producer": False,
                                     "w_ahead": 2, "interleave": False}
    fpx_cuda.wgmma_kernel_source(FPFormat.parse("e3m2"), False, launch["n_x"], False, launch["wgs"],
                                 launch["x_ahead"], launch["min_ctas"], True, launch["producer"], launch["w_ahead"])
    split, launch = fpx_cuda.wgmma_table_launch(entry, 256, None, None, None, None, None, None, 4)
    assert split is None and launch == dict(fpx_cuda.wgmma_resolve(256), w_ahead=4)
    small = dispatch.SmallM(4, True, 20.0, "small")
    assert fpx_cuda.wgmma_table_launch(small, 16, None, None, None, None, None, None, None) == \
        (None, fpx_cuda.wgmma_resolve(16))


def test_wgmma_kernel_launch_arithmetic():
    """x rows per CTA (multiples of 8, as even as the grid z allows), the instruction's operands, the shared memory
    of a launch, the default launch, and x's column order: logical column 16 ks + 8 h + 2 t + j of a tile holds
    column 32 t + 4 ks + 2 h + j (the small-M kernel's k order, which layout 2's fragments carry)."""
    from fp6llm.kernels import fpx_cuda
    assert [fpx_cuda.wgmma_n_x(m) for m in (1, 17, 64, 128, 129, 160, 300)] == [8, 24, 64, 128, 72, 80, 104]
    assert [fpx_cuda.wgmma_n_x(m, 64) for m in (17, 64, 65, 100)] == [24, 64, 40, 56]
    with pytest.raises(ValueError, match="8 to 256 x rows per CTA"):
        fpx_cuda.wgmma_n_x(64, 264)
    with pytest.raises(ValueError, match="more than a CTA's"):
        fpx_cuda.wgmma_kernel_source(FPFormat.parse("e3m2"), False, 256, False, 1, x_ahead=3)
    with pytest.raises(ValueError, match="N = 8..256"):
        fpx_cuda.wgmma_asm(12, False)
    defines = fpx_cuda.wgmma_asm(24, True)
    assert "m64n24k16.f32.bf16.bf16 {%0, %1," in defines[0] and "%11}, {%12, %13, %14, %15}, %16, p" in defines[0]
    assert defines[1].count('"+f"') == 12
    assert fpx_cuda.wgmma_shared_bytes(128, 1) == 2 * 128 * 256 + 1024  # this tile and the next
    assert fpx_cuda.wgmma_shared_bytes(64, 2) == 3 * 64 * 256 + 1024
    assert fpx_cuda.wgmma_launch(64) == {"n_x": 64, "wgs": 1, "x_ahead": 2, "min_ctas": 3}
    with pytest.raises(ValueError, match="cannot keep 32 accumulators and 2 weight tiles per thread at 4 CTAs of 4 "
                                         "warpgroups"):
        fpx_cuda.wgmma_kernel_source(FPFormat.parse("e3m2"), False, 64, False, 4, min_ctas=4)
    assert fpx_cuda.wgmma_launch(256)["n_x"] == 128
    from fp6llm.kernels.x_order import wgmma_x_order_reference
    x = torch.arange(3 * 256, dtype=torch.float32).view(3, 256)
    xp = wgmma_x_order_reference(x)
    for kt, ks, h, t, j in itertools.product(range(2), range(8), range(2), range(4), range(2)):
        assert xp[2, 128 * kt + 16 * ks + 8 * h + 2 * t + j] == x[2, 128 * kt + 32 * t + 4 * ks + 2 * h + j]
    assert sorted(xp[1].tolist()) == x[1].tolist()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wgmma_x_order_kernel_equals_the_reference(dtype):
    """x_order_kernel (the Triton launch the wgmma path makes) against the PyTorch permutation, on fresh random x
    with a row stride wider than K (a slice), K spanning two programs per row and a partial last one, and M = 0;
    x it cannot take is refused with a message."""
    from fp6llm.kernels.x_order import wgmma_x_order, wgmma_x_order_reference
    gen = torch.Generator().manual_seed(7)
    wide = torch.randn(6, 2304 + 64, generator=gen).to(DEVICE, dtype)
    for x in (wide[:, 32:32 + 2304], wide[:3, :128], wide[:0, :256]):
        out = wgmma_x_order(x)
        assert out.is_contiguous() and torch.equal(out, wgmma_x_order_reference(x)), tuple(x.shape)
    with pytest.raises(ValueError, match="K a multiple of 128"):
        wgmma_x_order(wide[:, :200])
    with pytest.raises(ValueError, match="2-byte x"):
        wgmma_x_order(wide[:, :256].float())


def test_mid_m_kernel_launch_arithmetic():
    """x rows per CTA: all of them up to 64, else evenly over grid z; the split fits the reserved partials."""
    from fp6llm.kernels import fpx_cuda
    assert [fpx_cuda.mid_blocks_m(m) for m in (1, 9, 33, 64, 65, 72, 128)] == [1, 2, 5, 8, 5, 5, 8]
    assert [fpx_cuda.mid_blocks_m(m, 2) for m in (1, 9, 33, 64)] == [1, 2, 2, 2]
    with pytest.raises(ValueError, match="1 to 8 n8 blocks"):
        fpx_cuda.mid_blocks_m(32, 9)
    assert fpx_cuda.mid_split_cap(8192, 64, 64) == 16  # K tiles / 4
    cap = fpx_cuda.mid_split_cap(57344, 128, 64)
    assert cap * 57344 * 128 <= fpx_cuda.MID_WORKSPACE_FLOATS < (cap + 1) * 57344 * 128
    assert fpx_cuda.choose_mid_split(8192, 8192, 32, 128, 132, 2) > 1  # 64 CTAs on 132 SMs: split
    assert fpx_cuda.choose_mid_split(57344, 8192, 32, 128, 132, 2) == 1  # 448 CTAs: no split pays


def test_shipped_h200_table_measured_both_small_m_kernels():
    """The H200 file: every M <= 16 entry of its e3m2 / FP16 table measured the CUDA kernel too, with a launch the
    kernel takes (split <= K tiles / 4: the workspace's reservation; split-K in a cluster only at splits of 2..8,
    the cluster sizes the kernel builds; two row tiles per warp only with x read at compute time), and the table
    holds both of those launches (re-tuned at M = 4..32 on 2026-12-04: 7 cluster and 5 two-row-tile entries)."""
    from fp6llm.kernels import fpx_cuda
    tables = dispatch.tables_in(dispatch.CONFIG_DIR / "h200.json")
    checked = clustered = two_tiles = 0
    for bucket, shapes in tables[("e3m2", "float16")].items():
        if int(bucket) > 16:
            continue
        for shape, entry in shapes.items():
            k = int(shape.split("x")[1])
            assert 1 <= entry["cuda"]["split"] <= max(1, k // 128 // 4) and entry["cuda"]["us"] > 0, (bucket, shape)
            if entry["cuda"].get("cluster_split"):
                assert 2 <= entry["cuda"]["split"] <= fpx_cuda.CLUSTER_SPLIT_MAX, (bucket, shape)
                clustered += 1
            if entry["cuda"].get("row_tiles", 1) > 1 and entry["cuda"].get("kernel") is None:
                assert entry["cuda"]["row_tiles"] == 2 and entry["cuda"]["prefetch_x"] is False, (bucket, shape)
                two_tiles += 1
            checked += 1
    assert checked >= 5 * 8 and clustered >= 2 and two_tiles >= 1, (checked, clustered, two_tiles)


def test_tuner_small_m_times_the_weight_rings_at_its_fastest_splits(monkeypatch):
    """bench/tune.py's small-M tuning, its timings faked on the CPU: every launch states every field (w_ahead 2 in
    the first round), then 3 and 4 weight tiles at the three fastest splits and half the fastest, x ahead or not at
    M <= 8 (only at compute time above, with one or two row tiles); the fastest of all is the entry, with its
    w_ahead."""
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench"))
    import tune
    timed = []

    def fake(qw, m, dtype, kernel, launches):  # split 6 fastest, then 8, 5; a ring of 4 at split 3 fastest of all
        timed.append(list(launches))
        def seconds(l):
            return ({6: 1.0, 8: 1.1, 5: 1.2}.get(l["split"], 2.0) - (1.5 if (l["w_ahead"], l["split"]) == (4, 3)
                                                                       else 0)) * 1e-5
        return sorted(((seconds(l), l) for l in launches), key=lambda r: r[0])

    monkeypatch.setattr(tune, "time_launches", fake)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    qw = types.SimpleNamespace(shape=(8192, 8192))
    entry = tune.tune_cuda(qw, 1, torch.float16)
    first, rings = timed
    assert all(set(l) == {"split", "prefetch_x", "row_tiles", "cluster_split", "w_ahead"} for l in first + rings)
    assert {l["w_ahead"] for l in first} == {2} and {l["w_ahead"] for l in rings} == {3, 4}
    assert {l["split"] for l in rings} == {6, 8, 5, 3} and len(rings) == 2 * 2 * 4 + 2 * 4  # and in a cluster
    assert {(l["prefetch_x"], l["split"]) for l in rings if l["cluster_split"]} == {(True, s) for s in (6, 8, 5, 3)}
    assert entry == dict(split=3, prefetch_x=True, row_tiles=1, cluster_split=False, w_ahead=4, us=5.0)
    # every kernel these launches load is among those the tuner compiles first, in parallel (for K = 8192 here)
    from fp6llm.kernels import fpx_cuda
    specs = tune.small_m_specs([1], hopper=True)
    assert all((1, l["prefetch_x"], l["row_tiles"], fpx_cuda.cluster_of(64, l["split"], l["cluster_split"]),
                l["w_ahead"]) in specs for l in first + rings)
    timed.clear()
    tune.tune_cuda(qw, 16, torch.float16)  # above 8 rows the rings read x at compute time only
    assert {l["prefetch_x"] for l in timed[1]} == {False} and len(timed[1]) == 2 * 4 * 2  # one and two row tiles
    assert not any(l["cluster_split"] for l in timed[1]) and {l["row_tiles"] for l in timed[1]} == {1, 2}
    specs = tune.small_m_specs([16], hopper=True)
    assert all((2, l["prefetch_x"], l["row_tiles"], fpx_cuda.cluster_of(64, l["split"], l["cluster_split"]),
                l["w_ahead"]) in specs for l in timed[0] + timed[1])
    assert len(tune.small_m_sources(FPFormat.parse("e3m2"), torch.float16, [1, 8, 16], True, True)) == len(
        tune.small_m_specs([1, 8, 16], True))


def test_tuner_keeps_wrong_launches_out_and_goes_on(monkeypatch, gen):
    """bench/tune.py's time_launches, the kernel and its timing faked on the CPU: a launch whose sums are wrong is
    printed, recorded and left out, the others are timed; with none right it gives None (as for a case the kernel
    does not take)."""
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench"))
    import tune
    from fp6llm.kernels import fpx_cuda
    qw = quantize_weight(torch.randn(64, 256, generator=gen), "e3m2")

    def kernel(x, planes, scales, bias, fmt, n, k, split, **launch):  # right but at split 2
        out = x.float() @ qw.dequantize(torch.float32).T
        return out + 1.0 if split == 2 else out

    monkeypatch.setattr(fpx_cuda, "supports", lambda *args: True)
    monkeypatch.setattr(fpx_cuda, "fpx_small_m", kernel)
    monkeypatch.setattr(tune, "rotating_calls", lambda *args: (None, 0))
    monkeypatch.setattr(tune, "time_calls", lambda calls, replays: 1e-5)
    monkeypatch.setattr(tune, "WRONG", [])
    results = tune.time_launches(qw, 4, torch.float32, "fpx_small_m", [dict(split=s) for s in (1, 2, 3)])
    assert [launch["split"] for _, launch in results] == [1, 3]
    assert [(wrong[0], wrong[2], wrong[6]) for wrong in tune.WRONG] == [("fpx_small_m", 4, dict(split=2))]
    assert tune.time_launches(qw, 4, torch.float32, "fpx_small_m", [dict(split=2)]) is None


def test_tuner_wgmma_launches_are_ones_the_kernel_builds():
    """Every wgmma launch bench/tune.py times (M = 8..512, with the producer variants and, up to 64 rows of x, four
    weight tiles in flight) is one the kernel builds for both dtypes (wgmma_kernel_source raises for one it cannot):
    a launch it refuses would stop a tuning run on the device. Each gives every field: a table entry's producer
    filled in beside an explicit launch made one the kernel refuses (M = 256, 2026-12-04)."""
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench"))
    import tune
    from fp6llm.kernels import fpx_cuda
    for m in (8, 16, 32, 64, 128, 256, 512, 1024, 4096):
        for launch in tune.wgmma_launches(m):
            assert set(launch) == {"n_x", "wgs", "x_ahead", "min_ctas", "producer", "w_ahead", "interleave"}, launch
            for bf16 in (False, True):
                fpx_cuda.wgmma_kernel_source(FPFormat.parse("e3m2"), bf16, launch["n_x"], False, launch["wgs"],
                                             launch["x_ahead"], launch["min_ctas"], True, launch["producer"],
                                             launch["w_ahead"], launch["interleave"])
        deep = [launch for launch in tune.wgmma_launches(m) if launch["w_ahead"] == 4]
        assert all(launch["n_x"] <= 64 for launch in deep) and (m > 64 or deep), m
    assert any(launch["producer"] for launch in tune.wgmma_launches(256))
    with pytest.raises(ValueError, match="2-4 K tiles of weights in flight, not 5"):
        fpx_cuda.wgmma_kernel_source(FPFormat.parse("e3m2"), False, 16, False, w_ahead=5)
    # four weight tiles at 64 rows of x and 4 CTAs per SM spilled in the loop: refused, and not timed
    assert fpx_cuda.wgmma_registers_fit(64, 1, 3, w_ahead=4) and not fpx_cuda.wgmma_registers_fit(64, 1, 4, w_ahead=4)
    with pytest.raises(ValueError, match="4 weight tiles per thread at 4 CTAs of 1 warpgroups"):
        fpx_cuda.wgmma_kernel_source(FPFormat.parse("e3m2"), False, 64, False, 1, 1, 4, w_ahead=4)
    # three consumer warpgroups only beside a producer, at one CTA per SM
    fpx_cuda.wgmma_kernel_source(FPFormat.parse("e3m2"), False, 128, False, 3, 2, 1, producer=True)
    with pytest.raises(ValueError, match="3 beside a producer, one CTA per SM"):
        fpx_cuda.wgmma_kernel_source(FPFormat.parse("e3m2"), False, 128, False, 3, 2, 1)
    assert any(launch["wgs"] == 3 and launch["producer"] for launch in tune.wgmma_launches(256))
    # the interleaved warpgroups: from M = 16 (the plain launches, where one more tile of x fits) and beside a
    # producer with x two or more tiles ahead (a stage is released a tile later)
    assert all(any(launch["interleave"] for launch in tune.wgmma_launches(m))
               for m in (16, 32, 64, 128, 256, 512, 1024, 4096))
    assert not any(launch["interleave"] for launch in tune.wgmma_launches(8))
    assert all(launch["x_ahead"] >= 2 for m in (128, 256, 1024) for launch in tune.wgmma_launches(m)
               if launch["interleave"] and launch["producer"])
    with pytest.raises(ValueError, match="beside a producer warpgroup with x 2 or more tiles ahead, not 1"):
        fpx_cuda.wgmma_kernel_source(FPFormat.parse("e3m2"), False, 128, False, 2, 1, 1, producer=True,
                                     interleave=True)
    # without a producer it keeps the previous tile of x too: one stage more than waiting does
    assert fpx_cuda.wgmma_shared_bytes(128, 2, True) == fpx_cuda.wgmma_shared_bytes(128, 3)
    with pytest.raises(ValueError, match="256 rows 2 tiles ahead take 263168 bytes"):
        fpx_cuda.wgmma_kernel_source(FPFormat.parse("e3m2"), False, 256, False, 2, 2, 1, interleave=True)


def test_shipped_h200_table_wgmma_launches_are_ones_the_kernel_takes():
    """Every "wgmma" launch in the H200 file (M = 8..512) is one the kernel builds (x rows per CTA a multiple of 8,
    at most WGMMA_MAX_N_X; registers for its CTAs per SM), covers its bucket's rows in a grid z, and splits K within
    the reserved partials."""
    from fp6llm.kernels import fpx_cuda
    tables = dispatch.tables_in(dispatch.CONFIG_DIR / "h200.json")
    checked = 0
    for bucket, shapes in tables[("e3m2", "float16")].items():
        for shape, entry in shapes.items():
            launch = dispatch._launch(entry["cuda"]) if isinstance(entry.get("cuda"), dict) else None
            if launch is None or launch.kernel != "wgmma":
                continue
            n, k = map(int, shape.split("x"))
            m = int(bucket)
            assert 8 <= m <= fpx_cuda.WGMMA_MAX_M and launch.n_x % 8 == 0 and launch.n_x <= fpx_cuda.WGMMA_MAX_N_X
            fpx_cuda.wgmma_kernel_source(FPFormat.parse("e3m2"), False, launch.n_x, True, launch.wgs, launch.x_ahead,
                                         launch.min_ctas, False, launch.producer, launch.w_ahead,
                                         launch.interleave)  # raises if it cannot
            cap = fpx_cuda.grid_split_cap(n, m, k, 64 * launch.wgs, launch.n_x)
            assert 1 <= launch.split <= cap, (bucket, shape, launch)
            checked += 1
    assert checked >= 30


def test_shipped_table_is_found_by_the_gpu_name(monkeypatch):
    """The H100 table is read for a device named as torch reports it: each measured shape gets its own entry (its
    time dropped; the entries of layout 1's 64-column blocks are the widening test's case)."""
    fake_gpu_name(monkeypatch, "NVIDIA H100 80GB HBM3")
    path = dispatch.CONFIG_DIR / f"{dispatch.device_key('cuda')}.json"
    checked = 0
    for bucket, shapes in json.loads(path.read_text())["configs"].items():
        for shape, entry in shapes.items():
            entry = {key: value for key, value in entry.items() if key != "us"}
            if entry["block_k"] >= dispatch.MIN_BLOCK_K:
                n, k = map(int, shape.split("x"))
                assert choose(int(bucket), n, k, device="cuda") == KernelConfig(**entry), (bucket, shape)
                checked += 1
    assert checked >= len(M_BUCKETS)


def test_heuristic_small_m_streams_with_split_k():
    """M <= 16 streams 64-row tiles with split-K when the tiles alone would not fill the SMs."""
    few_tiles = heuristic_config(1, 1024, 8192, 132)  # 16 tiles for 132 SMs
    assert (few_tiles.block_m, few_tiles.block_n, few_tiles.split_k) == (16, 64, 4)
    many_tiles = heuristic_config(8, 57344, 8192, 132)  # 896 tiles
    assert many_tiles.split_k == 1 and not many_tiles.swap_ab
    assert heuristic_config(64, 8192, 8192, 132).swap_ab
    assert heuristic_config(4096, 8192, 8192, 132).dequant_first


def test_kernel_supports_and_errors(gen):
    assert kernel_supports(FPFormat.parse("e3m2"), None, torch.float16)
    assert not kernel_supports(FPFormat.parse("e5m2"), None, torch.float16)  # would reach FP16 Inf codes
    assert kernel_supports(FPFormat.parse("e3m2"), 32, torch.float16)
    assert not kernel_supports(FPFormat.parse("e3m2"), 96, torch.float16)  # neither divides nor is a multiple of 128
    assert not kernel_supports(FPFormat.parse("e3m2"), None, torch.float32)
    qw = quantize_weight(torch.randn(8, 64, generator=gen))
    with pytest.raises(ValueError, match="does not handle"):
        fpx_gemm(torch.randn(2, 64, generator=gen), qw.planes, qw.scales, None, qw.fmt, 8, 64, None)
    with pytest.raises(ValueError, match="unit column stride"):
        fpx_gemm(torch.randn(64, 2, generator=gen).half().T, qw.planes, qw.scales, None, qw.fmt, 8, 64, None)
    with pytest.raises(ValueError, match="block_m must be 1"):
        KernelConfig(16, 32, 128, use_dot=False)
    with pytest.raises(ValueError, match="power of two >= 128"):
        KernelConfig(16, 32, 64)


@gpu
@pytest.mark.parametrize("fmt", ["e3m2", "e2m1"])
@pytest.mark.parametrize("m", [1, 7, 16, 33, 130])
def test_fpx_linear_cuda_default_dispatch(gen, fmt, m):
    w = torch.randn(384, 512, generator=gen).cuda() * 0.05
    qw = quantize_weight(w, fmt)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(2, m, 512, generator=gen).to("cuda", dtype)
        out = fpx_linear(x, qw)
        ref = x.double() @ qw.dequantize(torch.float64).T
        assert ((out.double() - ref).norm() / ref.norm()).item() < TOLERANCE[dtype]


@gpu
def test_torch_compile_fullgraph_and_cuda_graph(gen):
    from fp6llm import FPxLinear
    linear = torch.nn.Linear(512, 256)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(256, 512, generator=gen) * 0.05)
        linear.bias.copy_(torch.randn(256, generator=gen))
    layer = FPxLinear.from_linear(linear.cuda(), "e3m2")
    x = torch.randn(4, 512, generator=gen).to("cuda", torch.float16)
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True)
    assert torch.allclose(compiled(x), eager, rtol=1e-3, atol=1e-3)
    static_x = x.clone()
    layer(static_x)  # warm-up: compile and allocate split-K scratch before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer(static_x)
    fresh = torch.randn(x.shape, generator=gen).to(x)
    static_x.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.allclose(static_out, layer(fresh), rtol=1e-3, atol=1e-3)


@runs_kernel
@pytest.mark.parametrize("group_size", [None, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_first_path(gen, group_size, dtype):
    run_case(gen, "e3m2", 9, 40, 192, dtype, KernelConfig(64, 32, 128, dequant_first=True), group_size=group_size,
             with_bias=True)
    run_case(gen, "e2m1", 9, 40, 256, dtype, KernelConfig(64, 16, 256, dequant_first=True), group_size=group_size)


@runs_kernel
@pytest.mark.parametrize("fmt", ["e3m2", "e2m2", "e4m3"])
def test_dequantize_planes_matches_reference(gen, fmt):
    from fp6llm.kernels.fpx_gemm import dequantize_planes
    qw = quantize_weight(torch.randn(33, 200, generator=gen), fmt, None).to(DEVICE)
    out = dequantize_planes(qw.planes, qw.scales, qw.fmt, 33, 200, None, torch.float32)
    assert torch.equal(out.cpu(), qw.dequantize(torch.float32).cpu())  # exact: code * scale in float32


@gpu
@pytest.mark.parametrize("fmt", ["e3m2", "e2m3", "e2m1", "e4m3"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5, 8, 9, 16])
def test_cuda_small_m_kernel_matches_reference(gen, fmt, dtype, m):
    from fp6llm.kernels import fpx_cuda
    n, k = 200, 512
    qw = quantize_weight(torch.randn(n, k, generator=gen) * 0.05, fmt).to("cuda")
    x = torch.randn(m, k, generator=gen).to("cuda", dtype)
    bias = torch.randn(n, generator=gen).to("cuda", dtype) if m % 2 else None
    ref = x.double() @ qw.dequantize(torch.float64).T + (0 if bias is None else bias.double())
    for split in (1, 3):
        for fma_shifts, prefetch_x in ((False, True), (True, True), (False, False)):  # shifts by immediates /
            # multipliers; x read a tile ahead / at its tile's compute
            out = fpx_cuda.fpx_small_m(x, qw.planes, qw.scales, bias, qw.fmt, n, k, split, fma_shifts=fma_shifts,
                                       prefetch_x=prefetch_x)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            assert err < TOLERANCE[dtype], (split, fma_shifts, prefetch_x)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5, 9, 16])
def test_cuda_small_m_two_row_tiles_per_warp_equal_one(gen, dtype, m):
    """row_tiles=2 (each warp multiplies two 16-row tiles with each load of x) gives, bit for bit, the one-tile
    kernel's sums (the same chains per row tile), near the float64 reference: 208 rows (13 tiles: a warp whose
    second tile is past the last), splits 1, 3 (workspace) and 4 (a cluster), bias at odd M."""
    from fp6llm.kernels import fpx_cuda
    n, k = 208, 1024
    qw = quantize_weight(torch.randn(n, k, generator=gen) * 0.05, "e2m3").to("cuda")
    x = torch.randn(m, k, generator=gen).to("cuda", dtype)
    bias = torch.randn(n, generator=gen).to("cuda", dtype) if m % 2 else None
    ref = x.double() @ qw.dequantize(torch.float64).T + (0 if bias is None else bias.double())
    hopper = torch.cuda.get_device_capability() >= (9, 0)
    for split, cluster in ((1, False), (3, False)) + (((4, True),) if hopper else ()):
        one = fpx_cuda.fpx_small_m(x, qw.planes, qw.scales, bias, qw.fmt, n, k, split, prefetch_x=False,
                                   cluster_split=cluster)
        two = fpx_cuda.fpx_small_m(x, qw.planes, qw.scales, bias, qw.fmt, n, k, split, prefetch_x=False,
                                   cluster_split=cluster, row_tiles=2)
        assert torch.equal(two, one), split
        assert ((two.double() - ref).norm() / ref.norm()).item() < TOLERANCE[dtype], split


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 9, 16])
def test_cuda_small_m_deeper_weight_rings_equal_the_ping_pong(gen, dtype, m):
    """w_ahead 3 / 4 (weight tiles in registers per warp, a ring) gives, bit for bit, the ping-pong's sums (the same
    tiles into the same chains in the same order). 9 K tiles: 9 per CTA at split 1 (whole ring passes at 3, a
    partial one at 4), 3 at split 3 (less than one pass of 4), 2, 2, 2, 2, 1 at split 5, 3 per CTA of a cluster at
    split 4 (sm_90); x a tile ahead or not, two row tiles per warp, with and without programmatic launch and its
    early first tile; 208 rows (a partial row block), bias at odd M."""
    from fp6llm.kernels import fpx_cuda, launch
    n, k = 208, 9 * 128
    qw = quantize_weight(torch.randn(n, k, generator=gen) * 0.05, "e3m2").to("cuda")
    x = torch.randn(m, k, generator=gen).to("cuda", dtype)
    bias = torch.randn(n, generator=gen).to("cuda", dtype) if m % 2 else None
    ref = x.double() @ qw.dequantize(torch.float64).T + (0 if bias is None else bias.double())
    hopper = torch.cuda.get_device_capability() >= (9, 0)
    cases = [(1, False, True, 1), (3, False, False, 1), (1, False, False, 2), (5, False, True, 1)]
    cases += [(4, True, True, 1)] if hopper else []
    for split, cluster, prefetch_x, row_tiles in cases:
        for pdl, static in ((False, False),) + (((True, True),) if hopper else ()):
            with launch.static_weights() if static else contextlib.nullcontext():
                def run(w_ahead):
                    return fpx_cuda.fpx_small_m(x, qw.planes, qw.scales, bias, qw.fmt, n, k, split,
                                                prefetch_x=prefetch_x, cluster_split=cluster, pdl=pdl,
                                                row_tiles=row_tiles, w_ahead=w_ahead)
                two = run(2)
                for w_ahead in (3, 4):
                    assert torch.equal(run(w_ahead), two), (split, cluster, prefetch_x, row_tiles, pdl, w_ahead)
            assert ((two.double() - ref).norm() / ref.norm()).item() < TOLERANCE[dtype], split


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_cuda_small_m_kernel_cluster_split_equals_the_workspace_sums(gen, dtype, m):
    """Split-K in a cluster (sm_90: the row block's CTAs sum each other's partials in shared memory) at splits 2..8
    (8 K tiles: split 3 runs as 3 CTAs of 3, 3, 2 tiles) gives, bit for bit, the workspace path's sums (the same
    partials added in split order), near the float64 reference; 200 rows (a partial last row block); a captured
    graph replays it with fresh x."""
    from fp6llm.kernels import fpx_cuda
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("thread block clusters need sm_90")
    n, k = 200, 1024
    qw = quantize_weight(torch.randn(n, k, generator=gen) * 0.05, "e3m2").to("cuda")
    x = torch.randn(m, k, generator=gen).to("cuda", dtype)
    bias = torch.randn(n, generator=gen).to("cuda", dtype) if m % 2 else None
    ref = x.double() @ qw.dequantize(torch.float64).T + (0 if bias is None else bias.double())
    for split in (2, 3, 4, 8):
        out = fpx_cuda.fpx_small_m(x, qw.planes, qw.scales, bias, qw.fmt, n, k, split, cluster_split=True)
        assert torch.equal(out, fpx_cuda.fpx_small_m(x, qw.planes, qw.scales, bias, qw.fmt, n, k, split,
                                                     cluster_split=False)), split
        assert ((out.double() - ref).norm() / ref.norm()).item() < TOLERANCE[dtype], split
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fpx_cuda.fpx_small_m(x, qw.planes, qw.scales, bias, qw.fmt, n, k, 4, cluster_split=True)
    x.copy_(torch.randn(m, k, generator=gen).to("cuda", dtype))
    graph.replay()
    ref = x.double() @ qw.dequantize(torch.float64).T + (0 if bias is None else bias.double())
    assert ((out.double() - ref).norm() / ref.norm()).item() < TOLERANCE[dtype]


def test_launch_ex_structures_match_cuda_h():
    """cuLaunchKernelEx's structures as cuda.h lays them out (CUlaunchConfig: 7 unsigned, the stream at 32, the
    attributes at 40, their count at 48, 56 bytes; CUlaunchAttribute: id, 4 bytes of padding, a 64-byte value) and
    the arguments as torch's kernel launcher passes them (a tensor's data pointer, a C int, a C double)."""
    import ctypes
    from fp6llm.kernels import fpx_cuda
    assert ctypes.sizeof(fpx_cuda.LaunchAttribute) == 72 and fpx_cuda.LaunchAttribute.value.offset == 8
    config = fpx_cuda.LaunchConfig
    assert (config.hStream.offset, config.attrs.offset, config.numAttrs.offset, ctypes.sizeof(config)) == \
        (32, 40, 48, 56)
    t = torch.zeros(3)
    assert [fpx_cuda._slot(arg) for arg in (t, 7, -2.5)] == \
        [(ctypes.c_void_p, t.data_ptr()), (ctypes.c_int, 7), (ctypes.c_double, -2.5)]
    with pytest.raises(TypeError, match="not bool"):
        fpx_cuda._slot(True)


def test_cuda_small_m_cluster_split_launch():
    """The cluster variant takes 2..8 CTAs per row block (the portable cluster size) and a table entry's
    "cluster_split" reads back."""
    from fp6llm.kernels import fpx_cuda
    with pytest.raises(ValueError, match="2 to 8 CTAs per row block, not 9"):
        fpx_cuda.kernel_source(FPFormat.parse("e3m2"), False, 1, False, cluster_split=9)
    assert "#define CLUSTER_SPLIT 4" in fpx_cuda.kernel_source(FPFormat.parse("e3m2"), False, 1, False,
                                                               cluster_split=4)
    assert dispatch._launch({"split": 4, "cluster_split": True, "us": 9.0}).cluster_split
    assert not dispatch._launch({"split": 4, "us": 9.0}).cluster_split


@gpu
@pytest.mark.parametrize("fmt", ["e3m2", "e2m1", "e4m3"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [9, 33, 72])
def test_cuda_mid_m_kernel_matches_reference(gen, fmt, dtype, m):
    """The mid-M kernel at every launch shape tune times (row tiles x warps), unsplit and split, with and without
    bias; 200 rows (not a multiple of any CTA's rows), 6 K tiles (split 3: 2 per CTA), M = 72 in two z blocks."""
    from fp6llm.kernels import fpx_cuda
    n, k = 200, 768
    qw = quantize_weight(torch.randn(n, k, generator=gen) * 0.05, fmt).to("cuda")
    x = torch.randn(m, k, generator=gen).to("cuda", dtype)
    bias = torch.randn(n, generator=gen).to("cuda", dtype) if m % 2 else None
    ref = x.double() @ qw.dequantize(torch.float64).T + (0 if bias is None else bias.double())
    for row_tiles, warps in ((1, 4), (2, 4), (1, 8), (2, 8)):
        for split, blocks in ((1, None), (3, None), (3, 2)):  # blocks 2: 16 rows of x per CTA, grid z the rest
            out = fpx_cuda.fpx_mid_m(x, qw.planes, qw.scales, bias, qw.fmt, n, k, split, row_tiles, warps, blocks)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            assert err < TOLERANCE[dtype], (row_tiles, warps, split, blocks)


def _wgmma_case(gen, fmt, dtype, m: int, n: int, k: int) -> tuple:
    """(weight, x, bias or None (biased at odd M), the float64 reference) of fresh random inputs on the GPU."""
    qw = quantize_weight(torch.randn(n, k, generator=gen) * 0.05, fmt).to("cuda")
    x = torch.randn(m, k, generator=gen).to("cuda", dtype)
    bias = torch.randn(n, generator=gen).to("cuda", dtype) if m % 2 else None
    return qw, x, bias, x.double() @ qw.dequantize(torch.float64).T + (0 if bias is None else bias.double())


hopper = pytest.mark.skipif(not CUDA or INTERPRETED or torch.cuda.get_device_capability() != (9, 0),
                            reason="needs an sm_90 GPU (wgmma)")


@hopper
@pytest.mark.parametrize("fmt, dtype, m", [("e3m2", torch.float16, 17), ("e3m2", torch.float16, 64),
                                           ("e3m2", torch.bfloat16, 100), ("e3m2", torch.float16, 300),
                                           ("e2m1", torch.bfloat16, 64), ("e4m3", torch.float16, 33)])
def test_cuda_wgmma_kernel_matches_reference(gen, fmt, dtype, m):
    """The wgmma kernel, unsplit and split, 1, 2 and 4 warpgroups, with and without bias; 200 rows (not a multiple
    of a CTA's 64, 128 or 256), 6 K tiles; x rows per CTA as dispatched, and 8 (M = 17: grid z of three, the last
    partial), 192 (M = 300: two z blocks, the last partial) and 64 with four warpgroups (M = 300: five z blocks).
    The formats differ only in dequant_tile, which the other CUDA kernels share and test for every format."""
    from fp6llm.kernels import fpx_cuda
    n, k = 200, 768
    qw, x, bias, ref = _wgmma_case(gen, fmt, dtype, m, n, k)
    launches = [(1, None, 2), (3, None, 2), (2, None, 1)] + {17: [(2, 8, 2)], 64: [(2, 64, 4)],
                                                             300: [(1, 192, 2), (3, 64, 4)]}.get(m, [])
    for split, n_x, wgs in launches:
        out = fpx_cuda.fpx_wgmma(x, qw.planes, qw.scales, bias, qw.fmt, n, k, split, n_x, wgs)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < TOLERANCE[dtype], (split, n_x, wgs, err)


@hopper
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_layers_take_x_in_the_wgmma_order(gen, dtype):
    """x handed in the wgmma kernel's k order (a norm or silu_mul wrote it so): the wgmma kernel reads it without its
    x_order launch and sums the same bits as from its own copy; cuda_linear and FPxLinear give the plain result bit
    for bit at every M, whichever kernel runs (the small-M, mid-M or Triton ones take x back in column order first);
    takes_ordered_x says yes exactly where ops.cuda_path chose the wgmma kernel."""
    from fp6llm import ops
    from fp6llm.kernels import fpx_cuda
    from fp6llm.kernels.x_order import wgmma_x_order
    from fp6llm.nn import FPxLinear
    n, k = 200, 768
    qw, x, bias, ref = _wgmma_case(gen, "e3m2", dtype, 48, n, k)
    assert torch.equal(fpx_cuda.fpx_wgmma(wgmma_x_order(x), qw.planes, qw.scales, bias, qw.fmt, n, k, 2, 48, 1,
                                          x_ordered=True),
                       fpx_cuda.fpx_wgmma(x, qw.planes, qw.scales, bias, qw.fmt, n, k, 2, 48, 1))
    layer = FPxLinear(qw, bias)
    for m in (1, 16, 48, 200):
        x = torch.randn(m, k, generator=gen).to("cuda", dtype)
        plain = layer(x)
        assert torch.equal(layer(wgmma_x_order(x), x_ordered=True), plain), m
        path = ops.cuda_path(qw.fmt, 0, x, n, k)
        assert layer.takes_ordered_x(x) == (path == "wgmma"), (m, path)


@hopper
def test_cuda_model_logits_with_x_in_the_wgmma_order(gen, monkeypatch):
    """A llama model on the GPU (heads of 128, whole 128-column tiles) at 16 rows, where the H200 table sends its
    GEMMs to the wgmma kernel: with the norms, silu_mul and attention writing x in that kernel's order (the
    default) its logits equal those with the order off (FP6LLM_ORDER_X=0's nn.ORDER_X) bit for bit, and some layers
    did take ordered x."""
    from fp6llm import nn as fnn
    from fp6llm.models import ModelConfig, build_random
    config = ModelConfig(arch="llama", vocab_size=512, dim=256, n_layers=2, n_heads=2, n_kv_heads=1,
                         intermediate_size=512, max_position_embeddings=64)
    model = build_random(config, "e3m2", "cuda", dtype=torch.float16, seed=3, progress=False)
    tokens = torch.randint(0, 512, (16, 1), generator=gen).cuda()
    positions = torch.full((16, 1), 7, device="cuda")
    taken = []
    takes = fnn.FPxLinear.takes_ordered_x
    monkeypatch.setattr(fnn.FPxLinear, "takes_ordered_x", lambda self, x: taken.append(takes(self, x)) or taken[-1])
    logits = []
    for order in (True, False):
        monkeypatch.setattr(fnn, "ORDER_X", order)
        with torch.no_grad():
            model.setup_caches(16, 32)
            model(torch.randint(0, 512, (16, 7), generator=torch.Generator().manual_seed(0)).cuda(),
                  torch.arange(7, device="cuda").expand(16, 7))
            logits.append(model(tokens, positions))
    assert any(taken) and torch.equal(logits[0], logits[1])


@hopper
@pytest.mark.parametrize("fmt, dtype, m", [("e3m2", torch.float16, 16), ("e3m2", torch.bfloat16, 9),
                                           ("e2m3", torch.float16, 64), ("e4m3", torch.bfloat16, 33)])
def test_cuda_wgmma_weight_tiles_in_flight_keep_the_sums(gen, fmt, dtype, m):
    """Three or four weight tiles in flight per warp (w_ahead) sum each output in the same order as two: equal bit
    for bit, at 7 K tiles per CTA (not a multiple of 3 or 4) and split-K (2 to 4 tiles per CTA), one and two
    warpgroups, with and without a producer warpgroup, with and without bias; and near the float64 reference."""
    from fp6llm.kernels import fpx_cuda
    n, k = 200, 896
    qw, x, bias, ref = _wgmma_case(gen, fmt, dtype, m, n, k)
    for split, wgs, producer in ((1, 1, False), (2, 1, False), (3, 2, False), (1, 2, True), (2, 1, True)):
        two = fpx_cuda.fpx_wgmma(x, qw.planes, qw.scales, bias, qw.fmt, n, k, split, None, wgs, producer=producer,
                                 w_ahead=2)
        for w_ahead in (3, 4):
            out = fpx_cuda.fpx_wgmma(x, qw.planes, qw.scales, bias, qw.fmt, n, k, split, None, wgs,
                                     producer=producer, w_ahead=w_ahead)
            assert torch.equal(out, two), (split, wgs, producer, w_ahead)
        err = ((two.double() - ref).norm() / ref.norm()).item()
        assert err < TOLERANCE[dtype], (split, wgs, producer, err)


@hopper
@pytest.mark.parametrize("fmt, dtype, m", [("e3m2", torch.float16, 64), ("e3m2", torch.bfloat16, 131),
                                           ("e2m1", torch.float16, 24), ("e4m3", torch.bfloat16, 201)])
def test_cuda_wgmma_interleaved_warpgroups_keep_the_sums(gen, fmt, dtype, m):
    """The plain wgmma kernel with each k-step de-quantized beside the wgmma of the k-steps before it (interleave:
    8 commit groups a tile, up to 7 in flight, one more tile of x in shared memory) sums each output in the same
    order as waiting for each tile: equal bit for bit, at x 1 to 3 tiles ahead against 12 K tiles, split-K, one,
    two and four warpgroups, partial z blocks, with and without bias (the case's); and near the float64
    reference."""
    from fp6llm.kernels import fpx_cuda
    n, k = 200, 1536
    qw, x, bias, ref = _wgmma_case(gen, fmt, dtype, m, n, k)
    for n_x, split, wgs, x_ahead in ((64, 1, 1, 1), (64, 3, 1, 2), (128, 2, 2, 1), (32, 1, 4, 3), (40, 2, 1, 1)):
        waited = fpx_cuda.fpx_wgmma(x, qw.planes, qw.scales, bias, qw.fmt, n, k, split, n_x, wgs, x_ahead,
                                    producer=False, interleave=False)
        out = fpx_cuda.fpx_wgmma(x, qw.planes, qw.scales, bias, qw.fmt, n, k, split, n_x, wgs, x_ahead,
                                 producer=False, interleave=True)
        assert torch.equal(out, waited), (n_x, split, wgs, x_ahead)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < TOLERANCE[dtype], (n_x, split, wgs, x_ahead, err)


@hopper
@pytest.mark.parametrize("fmt, dtype, m", [("e3m2", torch.float16, 128), ("e3m2", torch.bfloat16, 77),
                                           ("e2m3", torch.float16, 300), ("e4m3", torch.bfloat16, 40)])
def test_cuda_wgmma_producer_kernel_equals_the_plain_one(gen, fmt, dtype, m):
    """The warp-specialized wgmma kernel (a producer warpgroup copying x into an mbarrier ring) sums each output in
    the plain kernel's order: equal bit for bit, at rings of 2 to 6 stages against 12 K tiles (each stage reused),
    split-K (slabs and counters shared with the plain path), partial z blocks, with and without bias, one, two and
    three consumer warpgroups (three: 192 weight rows per CTA, the producer's registers handed to them), each
    k-step de-quantized beside the wgmma before it (interleave: 8 commit groups a tile, a stage released a tile
    later) or not; above 128 rows also two consumers on 256 rows of x (setmaxnreg 168 -> 40 / 232); and near the
    float64 reference."""
    from fp6llm.kernels import fpx_cuda
    n, k = 200, 1536
    qw, x, bias, ref = _wgmma_case(gen, fmt, dtype, m, n, k)
    n_x = 128 if m >= 128 else 64 if m > 40 else 40
    for split, wgs, x_ahead, interleave in ((1, 2, 1, False), (3, 2, 2, False), (2, 1, 5, False), (1, 2, 3, False),
                                            (1, 3, 2, False), (2, 3, 4, False), (1, 2, 2, True), (3, 2, 3, True),
                                            (2, 1, 6, True), (1, 3, 2, True), (2, 3, 4, True)):
        plain = fpx_cuda.fpx_wgmma(x, qw.planes, qw.scales, bias, qw.fmt, n, k, split, n_x, wgs)
        out = fpx_cuda.fpx_wgmma(x, qw.planes, qw.scales, bias, qw.fmt, n, k, split, n_x, wgs, x_ahead,
                                 producer=True, interleave=interleave)
        assert torch.equal(out, plain), (split, wgs, x_ahead, interleave)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < TOLERANCE[dtype], (split, wgs, x_ahead, interleave, err)
    if m > 128:  # 256 rows of x per CTA (300 rows: one full z block and one of 44)
        plain = fpx_cuda.fpx_wgmma(x, qw.planes, qw.scales, bias, qw.fmt, n, k, 2, 256, 2)
        for interleave in (False, True):
            out = fpx_cuda.fpx_wgmma(x, qw.planes, qw.scales, bias, qw.fmt, n, k, 2, 256, 2, 2, producer=True,
                                     interleave=interleave)
            assert torch.equal(out, plain), interleave


@gpu
@pytest.mark.parametrize("kernel, m", [("fpx_small_m", 4), ("fpx_mid_m", 100), ("fpx_wgmma", 100)])
def test_cuda_kernels_replay_in_a_graph(gen, kernel, m):
    """Split-K arrival counters reset themselves (the mid-M kernel's: one per row block and z block): a captured
    launch replays with fresh inputs; an eager launch between capture and replay is right too."""
    from fp6llm.kernels import fpx_cuda
    if kernel == "fpx_wgmma" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("wgmma needs an sm_90 GPU")
    launch = getattr(fpx_cuda, kernel)
    qw = quantize_weight(torch.randn(1024, 2048, generator=gen) * 0.05, "e3m2").to("cuda")
    x = torch.randn(m, 2048, generator=gen).to("cuda", torch.float16)
    launch(x, qw.planes, qw.scales, None, qw.fmt, 1024, 2048, 4)  # warm-up: compile, workspace
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = launch(x, qw.planes, qw.scales, None, qw.fmt, 1024, 2048, 4)
    eager = launch(x, qw.planes, qw.scales, None, qw.fmt, 1024, 2048, 4)  # before any replay
    ref = x.double() @ qw.dequantize(torch.float64).T
    assert ((eager.double() - ref).norm() / ref.norm()).item() < TOLERANCE[torch.float16]
    for _ in range(3):
        x.copy_(torch.randn(m, 2048, generator=gen).to("cuda", torch.float16))
        graph.replay()
        ref = x.double() @ qw.dequantize(torch.float64).T
        assert ((out.double() - ref).norm() / ref.norm()).item() < TOLERANCE[torch.float16]
