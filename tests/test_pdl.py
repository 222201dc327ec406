"""Programmatic dependent launch (kernels/launch.py): off by default and scoped; every kernel that takes it waits for
the previous grid before its first memory access (machine code for sm_90a, compiled on the CPU); on a Hopper GPU, a
decode step launched with it gives the tokens and logits of the same step launched without, bit for bit."""

import contextlib
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fp6llm.formats import FPFormat
from fp6llm.kernels import launch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_sass import nvrtc_available  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
MEMORY = ("LDG", "STG", "LD", "ST", "LDS", "STS", "ATOM", "ATOMG", "RED", "LDGSTS", "UBLKCP", "UBLKPF")


def test_programmatic_launch_is_on_by_default_and_scoped(monkeypatch):
    """On unless FP6LLM_PDL=0 (read at import); programmatic_launch sets and restores the flag, on an error too; a CPU
    launch never takes it."""
    code = "import fp6llm.kernels.launch as l; print(l.PDL)"
    for value, printed in ((None, "True"), ("0", "False"), ("1", "True")):
        env = {k: v for k, v in os.environ.items() if k != "FP6LLM_PDL"}
        env.update({} if value is None else {"FP6LLM_PDL": value})
        ran = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert ran.stdout.strip() == printed, (value, ran.stdout, ran.stderr[-500:])
    monkeypatch.setattr(launch, "PDL", True)
    assert not launch.enabled("cpu")  # a CPU tensor's launch (the interpreter, tests) never takes it
    assert launch.triton_options("cpu") == {"PDL": False}
    with launch.programmatic_launch(False):
        assert launch.PDL is False
        with launch.programmatic_launch():
            assert launch.PDL is True
        assert launch.PDL is False
    assert launch.PDL is True
    with pytest.raises(RuntimeError):
        with launch.programmatic_launch(False):
            raise RuntimeError("inside")
    assert launch.PDL is True  # restored on an error too
    assert not launch.weights_static()
    with pytest.raises(RuntimeError):
        with launch.static_weights():
            assert launch.weights_static()
            raise RuntimeError("inside")
    assert not launch.weights_static()


def test_programmatic_launch_needs_hopper_nvidia_and_a_recent_driver(monkeypatch):
    """enabled() on a CUDA device: capability 9.0 or newer, not ROCm, a driver of CUDA 12.3 or newer; each missing
    piece turns it off (the device queries faked, on a CPU)."""
    monkeypatch.setattr(launch, "PDL", True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for capability, hip, driver, expected in (((9, 0), None, 13000, True), ((10, 0), None, 12080, True),
                                              ((8, 0), None, 13000, False), ((9, 0), "6.2", 13000, False),
                                              ((9, 0), None, 12020, False), ((9, 0), None, 0, False)):
        launch._supported.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None, c=capability: c)
        monkeypatch.setattr(torch.version, "hip", hip)
        monkeypatch.setattr(launch, "driver_version", lambda d=driver: d)
        assert launch.enabled(torch.device("cuda", 0)) is expected, (capability, hip, driver)
    launch._supported.cache_clear()


@pytest.mark.skipif(not nvrtc_available(), reason="NVRTC not installed (the test extra installs nvidia-cuda-nvrtc)")
@pytest.mark.parametrize("kernel", ["mid", "wgmma", "wgmma-producer"])
def test_cuda_mid_and_wgmma_pdl_wait_before_any_memory_access(kernel):
    """The mid-M and wgmma kernels' PDL variants for sm_90a (the wgmma kernel also warp-specialized: its mbarriers
    are set up before the wait, in shared memory alone): one grid-dependency wait (ACQBULK) before every load and
    store, one trigger for the next grid (PREEXIT) after it; without PDL neither instruction."""
    sys.path.insert(0, str(ROOT / "bench"))
    import sass
    from fp6llm.kernels import fpx_cuda
    fmt = FPFormat.parse("e3m2")
    for pdl in (False, True):
        if kernel == "mid":
            cubin = fpx_cuda.nvrtc_compile(fpx_cuda.mid_kernel_source(fmt, False, 2, 2, 8, True, pdl), "sm_90a",
                                           "fpx_mid_m.cu")
        elif kernel == "wgmma":
            cubin = fpx_cuda.nvrtc_compile(fpx_cuda.wgmma_kernel_source(fmt, False, 64, True, 1, 1, 4, pdl),
                                           "sm_90a", "fpx_wgmma.cu")
        else:
            cubin = fpx_cuda.nvrtc_compile(fpx_cuda.wgmma_kernel_source(fmt, False, 128, True, 2, 3, 1, pdl, True),
                                           "sm_90a", "fpx_wgmma.cu")
        ops = [op for _, op, _, _ in sass.disassemble(cubin)]
        if not pdl:
            assert "ACQBULK" not in ops and "PREEXIT" not in ops
            continue
        wait = ops.index("ACQBULK")
        assert ops.count("ACQBULK") == 1 and ops.count("PREEXIT") == 1 and ops.index("PREEXIT") > wait
        assert not [op for op in ops[:wait] if op in MEMORY], ops[:wait]


def _triton_cases():
    """(kernel, signature, constexprs) of each Triton kernel of a decode step that takes a PDL flag."""
    from fp6llm.kernels import activation, attention, norm, rotary, x_order
    i32, f16, f32 = "i32", "*fp16", "*fp32"
    return [
        (x_order.x_order_kernel, dict(x_ptr="*i32", out_ptr="*i32", row_words=i32, k_words=i32),
         dict(BLOCK=x_order.BLOCK_WORDS)),
        (norm.add_norm_kernel, dict(x_ptr=f16, delta_ptr=f16, weight_ptr=f16, bias_ptr=f16, out_ptr=f16, total_ptr=f16,
                                    d=i32, x_stride=i32, delta_stride=i32, eps="fp32"),
         dict(HAS_DELTA=True, RMS=True, HAS_BIAS=False, BLOCK_D=4096)),
        (activation.silu_mul_kernel, dict(gate_up_ptr=f16, out_ptr=f16, inner=i32, row_stride=i32),
         dict(BLOCK=activation.BLOCK)),
        (rotary.rotary_write_kernel,
         dict(x_ptr=f16, pos_ptr="*i64", cos_ptr=f32, sin_ptr=f32, q_ptr=f16, k_cache=f16, v_cache=f16,
              slot_ptr="*i64", t=i32, n_q=i32, n_kv=i32, half=i32, stride_b=i32, stride_t=i32, stride_h=i32,
              pos_stride_b=i32, pos_stride_t=i32, table_stride=i32, slot_stride_b=i32, stride_cs=i32, stride_ch=i32),
         dict(BLOCK_H=rotary.BLOCK_H, BLOCK_HALF=64)),
        (attention._decode_kernel,
         dict(q_ptr=f16, k_cache=f16, v_cache=f16, block_tables="*i32", seq_lens="*i32", input_pos="*i64",
              acc_ptr=f32, ml_ptr=f32, out_ptr=f16, sm_scale="fp32", window=i32, stride_qb=i32, stride_qh=i32,
              stride_tb=i32, stride_cb=i32, stride_cs=i32, stride_ch=i32, stride_pb=i32, stride_ob=i32,
              stride_oh=i32),
         dict(GROUPS=1, SPLITS=4, BLOCK_G=16, BLOCK_SIZE=16, BLOCK_D=128, HEAD_DIM=128, DOT_FP32=False, BLOCK_N=64)),
        (attention._combine_kernel, dict(acc_ptr=f32, ml_ptr=f32, out_ptr=f16, H=i32, stride_ob=i32, stride_oh=i32),
         dict(SPLITS=4, BLOCK_S=4, BLOCK_D=128, HEAD_DIM=128)),
    ]


def check_triton_pdl() -> None:
    """Each Triton kernel of the decode step compiled for sm_90a (run with TRITON_INTERPRET=0) with PDL:
    griddepcontrol.wait, then griddepcontrol.launch_dependents, both before the first global load or store of its
    PTX, and the launch attribute in its metadata; without PDL, neither."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    for fn, signature, constexprs in _triton_cases():
        for pdl in (False, True):
            constants = dict(constexprs, PDL=pdl)
            sig = dict(signature, **{name: "constexpr" for name in constants})
            pointers = [(i,) for i, kind in enumerate(sig.values()) if kind.startswith("*")]
            source = ASTSource(fn, sig, constexprs=constants, attrs={p: [["tt.divisibility", 16]] for p in pointers})
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": 4, "launch_pdl": pdl})
            ptx = compiled.asm["ptx"]
            first_access = min(i for i in (ptx.find("ld.global"), ptx.find("st.global")) if i >= 0)
            if not pdl:
                assert "griddepcontrol" not in ptx and not compiled.metadata.launch_pdl, fn.__name__
                continue
            wait, trigger = ptx.find("griddepcontrol.wait"), ptx.find("griddepcontrol.launch_dependents")
            assert 0 <= wait < trigger < first_access, (fn.__name__, wait, trigger, first_access)
            assert compiled.metadata.launch_pdl, fn.__name__
            print(fn.__name__, "ok")


def test_triton_decode_kernels_with_pdl_wait_before_any_memory_access():
    """check_triton_pdl in a process that compiles (the suite runs the interpreter)."""
    pytest.importorskip("triton")
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import test_pdl; test_pdl.check_triton_pdl()"
    ran = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "0"},
                         capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, (ran.stdout + ran.stderr)[-3000:]
    assert ran.stdout.count(" ok") == len(_triton_cases())


def _small_llama():
    """A random llama whose projections the CUDA kernels take (dims multiples of 128; head dim 128)."""
    from fp6llm.models.config import ModelConfig
    config = dataclasses.replace(ModelConfig.from_name("tiny-llama"), dim=512, n_heads=4, n_kv_heads=2,
                                 intermediate_size=1024, n_layers=3)
    return config


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 12, 40])
def test_cuda_decode_with_pdl_equals_without(batch):
    """Greedy decoding of random prompts (CUDA graphs; batch 1 runs the small-M kernel, 12 and 40 what the GPU's
    table picks for the nearest measured shape: the small-M, mid-M, wgmma or Triton kernel) with every kernel that
    takes it launched by programmatic dependent launch: the same tokens and the same logits, bit for bit, as
    without. A kernel that read its input before waiting would see the previous
    step's or a half-written one."""
    assert launch.driver_version() > 0  # readable wherever torch runs CUDA: else PDL would be off unnoticed
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs sm_90")
    with launch.programmatic_launch():
        assert launch.enabled("cuda") or launch.driver_version() < launch.MIN_DRIVER
    from test_attention import recorded_logits

    from fp6llm.engine.generate import Engine
    from fp6llm.models.loader import build_random
    model = build_random(_small_llama(), "e3m2", "cuda", seed=0, progress=False)
    gen = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(3, 500, (int(n),), generator=gen).tolist()
               for n in torch.randint(4, 60, (batch,), generator=gen)]
    results = []
    for pdl in (False, True):
        with launch.programmatic_launch(pdl):
            engine = Engine(model, None, max_batch_size=batch, max_seq_len=128, cuda_graph=True)
            engine.warm_up()
            results.append(recorded_logits(engine, prompts, 8))
            engine.close()
    (tokens, logits), (tokens_pdl, logits_pdl) = results
    assert tokens == tokens_pdl
    assert all(torch.equal(a, b) for a, b in zip(logits, logits_pdl))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("kernel", ["mid", "wgmma"])
def test_cuda_mid_and_wgmma_pdl_chain_reads_the_previous_output(kernel):
    """Three layers in a row, each one's x the previous one's output, launched by programmatic dependent launch,
    eager and captured in a graph: equal, bit for bit, to the same chain launched without it (splits 1 and 3)."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs sm_90")
    from fp6llm import quantize_weight
    from fp6llm.kernels import fpx_cuda
    gen = torch.Generator().manual_seed(7)
    n = k = 1024
    m = 48
    layers = [quantize_weight(torch.randn(n, k, generator=gen) * 0.03, "e3m2").to("cuda") for _ in range(3)]
    run = fpx_cuda.fpx_mid_m if kernel == "mid" else fpx_cuda.fpx_wgmma

    def chain(x, pdl, split):
        for qw in layers:
            x = run(x, qw.planes, qw.scales, None, qw.fmt, n, k, split, pdl=pdl)
        return x

    for split in (1, 3):
        x0 = torch.randn(m, k, generator=gen).to("cuda", torch.float16)
        expected = chain(x0, False, split)
        assert torch.equal(chain(x0, True, split), expected), split
        x = x0.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(x, True, split)
        x.copy_(torch.randn(m, k, generator=gen).to("cuda", torch.float16))
        graph.replay()
        assert torch.equal(out, chain(x, False, split)), split


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("early", [False, True])
@pytest.mark.parametrize("m", [1, 16])
def test_cuda_small_m_pdl_chain_reads_the_previous_output(m, early):
    """The small-M kernel by PDL, with and without its first weight tile loaded before the wait (early, within
    launch.static_weights): three layers in a row, each one's x the previous one's output, eager and captured in a graph; each launch may start
    while the previous drains, so a read of x before the wait would see a stale or half-written input. Equal, bit
    for bit, to the chain launched without PDL (splits 1, 3 and a cluster of 4)."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs sm_90")
    from fp6llm import quantize_weight
    from fp6llm.kernels import fpx_cuda
    gen = torch.Generator().manual_seed(m)
    n = k = 1024
    layers = [quantize_weight(torch.randn(n, k, generator=gen) * 0.03, "e3m2").to("cuda") for _ in range(3)]

    def chain(x, pdl, split, cluster):
        for qw in layers:
            x = fpx_cuda.fpx_small_m(x, qw.planes, qw.scales, None, qw.fmt, n, k, split, cluster_split=cluster,
                                     pdl=pdl)
        return x

    for split, cluster in ((1, False), (3, False), (4, True)):
        x0 = torch.randn(m, k, generator=gen).to("cuda", torch.float16)
        expected = chain(x0, False, split, cluster)
        with launch.static_weights() if early else contextlib.nullcontext():
            assert torch.equal(chain(x0, True, split, cluster), expected), split
            x = x0.clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = chain(x, True, split, cluster)
        x.copy_(torch.randn(m, k, generator=gen).to("cuda", torch.float16))
        graph.replay()
        assert torch.equal(out, chain(x, False, split, cluster)), split
