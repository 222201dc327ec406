"""The decoders' fused kernels (kernels/norm.py, rotary.py, activation.py) against float64 math, in Triton's
interpreter on a CPU (TRITON_INTERPRET=1, conftest.py), and their custom ops (decoder_ops.py) against the PyTorch
references.

Tolerance: relative Frobenius error against float64 below TOLERANCE[dtype]: the output rounding of the dtype
(2^-11 relative for float16, 2^-8 for bfloat16) dominates; the kernels compute in float32. The PyTorch references
round the same way and meet the same bound.
"""

import copy
import os

import pytest
import torch

triton = pytest.importorskip("triton")

from fp6llm import decoder_ops  # noqa: E402
from fp6llm.engine import ByteTokenizer, Engine  # noqa: E402
from fp6llm.decoder_ops import add_norm_reference, rotary_reference, silu_mul_reference  # noqa: E402
from fp6llm.kernels.activation import silu_mul  # noqa: E402
from fp6llm.kernels.norm import add_norm  # noqa: E402
from fp6llm.kernels.rotary import rotary  # noqa: E402
from fp6llm.models import ModelConfig, build_random  # noqa: E402

TOLERANCE = {torch.float16: 4e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}
CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if CUDA and not INTERPRETED else "cpu"
runs_kernel = pytest.mark.skipif(not CUDA and not INTERPRETED, reason="needs CUDA or TRITON_INTERPRET=1")
DTYPES = [torch.float16, torch.bfloat16]


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.double() - expected).norm() / expected.norm()).item()


def norm64(total: torch.Tensor, weight, bias, eps: float, rms: bool) -> torch.Tensor:
    t = total.double()
    if rms:
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
    t = (t - t.mean(-1, keepdim=True)) * torch.rsqrt(t.var(-1, unbiased=False, keepdim=True) + eps)
    return t * weight.double() + bias.double()


@runs_kernel
@pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
@pytest.mark.parametrize("rms", [True, False], ids=["rmsnorm", "layernorm"])
@pytest.mark.parametrize("with_delta", [True, False], ids=["add", "no-add"])
def test_add_norm_kernel(dtype, rms, with_delta, gen):
    rows, d, eps = 5, 100, 1e-5  # odd row count, D not a power of two
    wide = (torch.randn(rows, d + 28, generator=gen) * 3).to(DEVICE, dtype)
    x = wide[:, 3:3 + d]  # a row stride that is not D
    delta = torch.randn(rows, d, generator=gen).to(DEVICE, dtype) if with_delta else None
    weight = (1 + 0.3 * torch.randn(d, generator=gen)).to(DEVICE, dtype)
    bias = None if rms else (0.2 * torch.randn(d, generator=gen)).to(DEVICE, dtype)
    out, total = add_norm(x, delta, weight, bias, eps, rms)
    expected_total = x if delta is None else x + delta
    assert out.shape == x.shape and out.dtype == dtype
    # the sum is the dtype's rounding of x + delta; Triton's interpreter truncates float32 -> bfloat16 (1 ulp)
    bf16_ulp = 2**-7 if dtype == torch.bfloat16 and INTERPRETED else 0
    torch.testing.assert_close(total, expected_total, rtol=bf16_ulp, atol=0)
    expected = norm64(expected_total, weight, bias, eps, rms)
    assert rel_err(out, expected) < TOLERANCE[dtype]
    reference, _ = add_norm_reference(x, delta, weight, bias, eps, rms)
    assert rel_err(reference, expected) < TOLERANCE[dtype]


def rotary64(x, positions, cos, sin) -> torch.Tensor:
    cos, sin = cos.double()[positions][:, :, None], sin.double()[positions][:, :, None]
    x1, x2 = x.double().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_table(positions: int, half: int):
    angles = torch.outer(torch.arange(positions, dtype=torch.float32), 1.0 / 10000 ** (torch.arange(half) / half))
    return angles.cos().to(DEVICE), angles.sin().to(DEVICE)


@runs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_kernel_on_the_q_and_k_heads_of_a_fused_projection(dtype, gen):
    b, t, heads, kv_heads, d, table = 2, 3, 5, 1, 12, 40  # 5 + 1 rotated heads: not a multiple of BLOCK_H
    qkv = torch.randn(b, t, heads + 2 * kv_heads, d, generator=gen).to(DEVICE, dtype)
    x = qkv[:, :, :heads + kv_heads]  # a view with qkv's strides
    positions = torch.randint(0, table, (b, t), generator=gen).to(DEVICE)
    cos, sin = rope_table(table, d // 2)
    out = rotary(x, positions, cos, sin)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    expected = rotary64(x, positions, cos, sin)
    assert rel_err(out, expected) < TOLERANCE[dtype]
    assert rel_err(rotary_reference(x, positions, cos, sin), expected) < TOLERANCE[dtype]


@runs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_kernel(dtype, gen):
    gate_up = (torch.randn(3, 2, 2 * 37, generator=gen) * 2).to(DEVICE, dtype)  # I = 37, odd
    out = silu_mul(gate_up)
    g, u = gate_up.double().chunk(2, dim=-1)
    expected = g * torch.sigmoid(g) * u
    assert out.shape == (3, 2, 37) and out.dtype == dtype
    assert rel_err(out, expected) < TOLERANCE[dtype]
    assert rel_err(silu_mul_reference(gate_up), expected) < TOLERANCE[dtype]


def test_custom_ops_are_the_references_on_the_cpu_and_trace(gen):
    x, delta = torch.randn(2, 3, 16, generator=gen), torch.randn(2, 3, 16, generator=gen)
    weight, bias = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    for rms in (True, False):
        out, total = decoder_ops.add_norm(x, delta, weight, None if rms else bias, 1e-6, rms)
        expected = add_norm_reference(x, delta, weight, None if rms else bias, 1e-6, rms)
        assert torch.equal(out, expected[0]) and torch.equal(total, expected[1])
        out, total = decoder_ops.add_norm(x, None, weight, None if rms else bias, 1e-6, rms)
        assert total is x and torch.equal(out, add_norm_reference(x, None, weight, None if rms else bias, 1e-6,
                                                                    rms)[0])
    positions = torch.randint(0, 8, (2, 3), generator=gen)
    cos, sin = (t.cpu() for t in rope_table(8, 8))
    assert torch.equal(decoder_ops.rotary(x.view(2, 3, 1, 16), positions, cos, sin),
                       rotary_reference(x.view(2, 3, 1, 16), positions, cos, sin))
    assert torch.equal(decoder_ops.silu_mul(x), silu_mul_reference(x))
    # the fake implementations give torch.compile the shapes and dtypes the references produce
    for op, args in [(decoder_ops.add_norm_op, (x, delta, weight, bias, 1e-6, False)),
                     (decoder_ops.norm_op, (x, weight, None, 1e-6, True)),
                     (decoder_ops.rotary_op, (x.view(2, 3, 1, 16), positions, cos, sin)),
                     (decoder_ops.silu_mul_op, (x,))]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_bad_arguments_are_refused():
    x = torch.zeros(2, 3, 4, 8)
    with pytest.raises(ValueError, match="positions must be int64"):
        decoder_ops.rotary(x, torch.zeros(2, 3), torch.zeros(9, 4), torch.zeros(9, 4))
    with pytest.raises(ValueError, match=r"cos and sin must be float32 \[S, 4\]"):
        decoder_ops.rotary(x, torch.zeros(2, 3, dtype=torch.long), torch.zeros(9, 3), torch.zeros(9, 3))
    with pytest.raises(ValueError, match="even last dimension"):
        decoder_ops.silu_mul(torch.zeros(2, 7))
    with pytest.raises(ValueError, match="weight and bias must be"):
        add_norm(torch.zeros(2, 8), None, torch.zeros(7), None, 1e-6, True)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or INTERPRETED, reason="needs a CUDA device (compiled Triton)")
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_the_decoders_on_cuda_run_the_kernels_and_match_the_cpu_references(arch, gen):
    """float16 on CUDA (Triton kernels) against float32 on the CPU (references), same weights: relative error of
    the logits of a prefill and a decode step below 2e-2."""
    config = ModelConfig.from_name("tiny-llama") if arch == "llama" else ModelConfig(
        arch="opt", vocab_size=512, dim=64, n_layers=2, n_heads=4, intermediate_size=128, activation="relu",
        qkv_bias=True, o_bias=True, mlp_bias=True, position_offset=2, max_position_embeddings=64)
    cpu = build_random(config, "e3m2", "cpu", seed=1, progress=False)
    cuda = copy.deepcopy(cpu).to("cuda", torch.float16)
    tokens = torch.randint(0, config.vocab_size, (3, 9), generator=gen)
    logits = []
    for model, device in ((cpu, "cpu"), (cuda, "cuda")):
        model.setup_caches(3, 16)
        with torch.inference_mode():
            prefill = model(tokens[:, :8].to(device), torch.arange(8).expand(3, -1).to(device))
            step = model(tokens[:, 8:].to(device), torch.full((3, 1), 8, device=device))
        logits.append(torch.cat([prefill, step], dim=1).cpu().double())
    assert rel_err(logits[1], logits[0]) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or INTERPRETED, reason="needs a CUDA device (compiled Triton)")
def test_cuda_graphs_and_compile_of_the_fused_decode_step_generate_what_eager_does():
    model = build_random("tiny-llama", "e3m2", "cuda", dtype=torch.float16, seed=0, progress=False)
    prompts = ["fused kernels", "a lean decode step", "x"]
    texts = [Engine(model, ByteTokenizer(model.config.vocab_size), max_batch_size=4, max_seq_len=64, **options)
             .generate(prompts, max_new_tokens=12)
             for options in (dict(cuda_graph=False), dict(cuda_graph=True), dict(cuda_graph=True, compile=True))]
    assert texts[0] == texts[1] == texts[2]


def test_ops_call_their_kernels_directly_only_in_plain_eager_mode():
    """launch.direct: the ops skip their custom op's dispatch only for plain CUDA tensors in eager mode; a CPU
    tensor, a tensor subclass, a torch function or dispatch mode (FakeTensorMode is one), torch.compile's tracing and
    (on CUDA) a tensor that requires grad while autograd records keep the op."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from fp6llm.kernels import launch

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class PassthroughFunction(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class Subclass(torch.Tensor):
        pass

    assert launch.direct(None) and not launch.direct(torch.zeros(2)) and not launch.direct(None, torch.zeros(2))
    assert not launch.direct(torch.nn.Parameter(torch.zeros(2)))  # a CPU parameter (the CUDA test covers the rest)
    assert not launch.direct(torch.zeros(2).as_subclass(Subclass))
    with Passthrough():
        assert not launch.direct(None)
    with PassthroughFunction():
        assert not launch.direct(None)
    traced = torch.compile(lambda t: t + 1 if launch.direct(None) else t - 1, backend="eager", fullgraph=True)
    assert traced(torch.zeros(1)).item() == -1.0


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or INTERPRETED, reason="needs a CUDA device (compiled Triton)")
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_direct_kernel_calls_equal_the_custom_ops(arch, monkeypatch):
    """An eager prefill and decode on CUDA with the ops' kernels called directly (launch.direct) and through the
    custom ops: the same logits, bit for bit (the same kernels run either way)."""
    from fp6llm.kernels import launch
    config = ModelConfig.from_name("tiny-llama") if arch == "llama" else ModelConfig(
        arch="opt", vocab_size=512, dim=64, n_layers=2, n_heads=4, intermediate_size=128, activation="relu",
        qkv_bias=True, o_bias=True, mlp_bias=True, position_offset=2, max_position_embeddings=64)
    model = build_random(config, "e3m2", "cuda", dtype=torch.float16, seed=3, progress=False)
    tokens = torch.randint(0, config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(3)).to("cuda")
    weight = torch.nn.Parameter(torch.ones(4, device="cuda"))
    assert launch.direct(tokens) and not launch.direct(tokens, weight)  # autograd records a parameter: the op
    with torch.no_grad():
        assert launch.direct(tokens, weight)
    logits = []
    for direct in (True, False):
        if not direct:
            monkeypatch.setattr(launch, "direct", lambda *tensors: False)
        model.setup_caches(3, 16)
        with torch.inference_mode():
            prefill = model(tokens[:, :8], torch.arange(8, device="cuda").expand(3, -1))
            step = model(tokens[:, 8:], torch.full((3, 1), 8, device="cuda"))
        logits.append(torch.cat([prefill, step], dim=1))
    assert torch.equal(logits[0], logits[1])


@runs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_write_x_in_the_wgmma_order(dtype, gen):
    """add_norm's and silu_mul's kernels with order=True write what wgmma_x_order_reference makes of their plain
    output, bit for bit (D = 384 and I = 1152: three and nine 128-column tiles, with the norm's padding to 512 and
    silu_mul's program blocks of 1024 columns); total stays in column order; a width not a multiple of 128 is
    refused."""
    from fp6llm.kernels.wgmma_order import wgmma_x_order_reference, wgmma_x_unorder
    x, delta = (torch.randn(3, 2, 384, generator=gen).to(DEVICE, dtype) for _ in range(2))
    weight = torch.randn(384, generator=gen).to(DEVICE)
    for d in (delta, None):
        plain, total = add_norm(x, d, weight, None, 1e-6, True)
        ordered, total_ordered = add_norm(x, d, weight, None, 1e-6, True, order=True)
        assert torch.equal(ordered, wgmma_x_order_reference(plain)) and torch.equal(total_ordered, total)
        assert torch.equal(wgmma_x_unorder(ordered), plain)
    gate_up = torch.randn(5, 2 * 1152, generator=gen).to(DEVICE, dtype)
    assert torch.equal(silu_mul(gate_up, order=True), wgmma_x_order_reference(silu_mul(gate_up)))
    with pytest.raises(ValueError, match="multiple of 128"):
        add_norm(x[..., :320], None, weight[:320], None, 1e-6, True, order=True)
    with pytest.raises(ValueError, match="multiple of 128"):
        silu_mul(gate_up[:, :2 * 64], order=True)


def test_ops_write_x_in_the_wgmma_order_on_every_path(gen):
    """decoder_ops.add_norm / silu_mul with order=True on the reference path (CPU) give the ordered reference; the
    inverse restores column order for any leading shape; widths not a multiple of 128 are refused there too."""
    from fp6llm.kernels.wgmma_order import wgmma_x_order_reference, wgmma_x_unorder
    x, delta = torch.randn(2, 3, 256, generator=gen), torch.randn(2, 3, 256, generator=gen)
    weight = torch.randn(256, generator=gen)
    out, total = decoder_ops.add_norm(x, delta, weight, None, 1e-6, True, order=True)
    expected = add_norm_reference(x, delta, weight, None, 1e-6, True)
    assert torch.equal(out, wgmma_x_order_reference(expected[0])) and torch.equal(total, expected[1])
    assert out.shape == x.shape and torch.equal(wgmma_x_unorder(out), expected[0])
    gate_up = torch.randn(4, 2, 512, generator=gen)
    assert torch.equal(decoder_ops.silu_mul(gate_up, order=True), wgmma_x_order_reference(silu_mul_reference(gate_up)))
    columns = torch.arange(128.0).expand(1, 128)  # column 32 t + 4 ks + 2 h + j at 16 ks + 8 h + 2 t + j
    assert wgmma_x_order_reference(columns)[0, 16 * 3 + 8 * 1 + 2 * 2 + 1].item() == 32 * 2 + 4 * 3 + 2 * 1 + 1
    with pytest.raises(ValueError, match="multiple of 128"):
        decoder_ops.add_norm(x[..., :64], None, weight[:64], None, 1e-6, True, order=True)
    with pytest.raises(ValueError, match="multiple of 128"):
        decoder_ops.silu_mul(gate_up[..., :128], order=True)
    with pytest.raises(ValueError, match=r"multiple of 128, got shape \(2, 100\)"):
        wgmma_x_unorder(torch.zeros(2, 100))
    assert wgmma_x_order_reference(torch.zeros(0, 3, 256)).shape == (0, 3, 256)  # an empty batch keeps its shape
    assert wgmma_x_unorder(torch.zeros(2, 0, 128)).shape == (2, 0, 128)
