"""fp6llm.evals: a tiny GGUF written here -> a Hugging Face checkpoint that fp6llm and transformers read alike; the
fake-quantized baselines; the quality table's invariants; the per-layer plan (its optimality, its budget, and a
plan written by the CLI that loads and generates through the normal path)."""

import itertools
import json

import pytest
import torch

from fp6llm.evals import lm, plan
from fp6llm.evals.baselines import NF4_LEVELS, Method, int_rtn, nf4
from fp6llm.quantize import fake_quantize, quantize_weight
from helpers import seed_of

gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")
DIM, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 128


def byte_level_alphabet() -> list:
    """GPT-2's byte -> printable character table: a byte-level BPE vocabulary with no merges."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_tiny_gguf(path, seed: int) -> None:
    """A 2-layer Llama in F32 GGUF (llama.cpp's tensor names), byte-level tokenizer, untied output."""
    rng = np.random.default_rng(seed)
    tokens = byte_level_alphabet() + ["<|endoftext|>"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(DIM)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(DIM // HEADS)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges([])
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)

    def tensor(*shape, scale=0.08):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    head_dim = DIM // HEADS
    writer.add_tensor("token_embd.weight", tensor(len(tokens), DIM, scale=1.0))
    writer.add_tensor("output_norm.weight", 1 + tensor(DIM))
    writer.add_tensor("output.weight", tensor(len(tokens), DIM))
    for i in range(LAYERS):
        for name, shape in [("attn_q", (HEADS * head_dim, DIM)), ("attn_k", (KV_HEADS * head_dim, DIM)),
                            ("attn_v", (KV_HEADS * head_dim, DIM)), ("attn_output", (DIM, HEADS * head_dim)),
                            ("ffn_gate", (FFN, DIM)), ("ffn_up", (FFN, DIM)), ("ffn_down", (DIM, FFN))]:
            writer.add_tensor(f"blk.{i}.{name}.weight", tensor(*shape))
        writer.add_tensor(f"blk.{i}.attn_norm.weight", 1 + tensor(DIM))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + tensor(DIM))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, module_gen):
    """A converted tiny GGUF directory (the weights are fresh each run, from module_gen: its seed is printed)."""
    from fp6llm.evals.gguf import convert_gguf

    seed = seed_of(module_gen)
    root = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(root / "tiny.gguf", seed)
    summary = convert_gguf(root / "tiny.gguf", root / "hf")
    assert summary["model_type"] == "llama" and summary["tensors"] == 3 + LAYERS * 9
    return root


def test_converted_gguf_runs_the_same_in_fp6llm_and_transformers(tiny_hf):
    from transformers import AutoModelForCausalLM

    from fp6llm.models import load_hf

    direct = AutoModelForCausalLM.from_pretrained(tiny_hf, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    converted, tokenizer = lm.load_causal_lm(tiny_hf / "hf")
    ours = load_hf(tiny_hf / "hf", "fp32", device="cpu", progress=False)
    ids = torch.tensor([tokenizer("def main():\n    return 1", add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        expected = direct(input_ids=ids).logits
        assert torch.allclose(converted(input_ids=ids).logits, expected, atol=1e-5)
        ours.setup_caches(1, ids.shape[1], device="cpu")
        got = ours(ids, torch.arange(ids.shape[1])[None])
    assert float((got - expected).norm() / expected.norm()) < 1e-5


def test_convert_gguf_errors(tmp_path):
    from fp6llm.evals.gguf import convert_gguf

    with pytest.raises(FileNotFoundError):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    (tmp_path / "bad.gguf").write_bytes(b"nope")
    with pytest.raises(ValueError, match="not a GGUF"):
        convert_gguf(tmp_path / "bad.gguf", tmp_path / "out")


def test_method_names_bits_and_errors():
    assert Method.parse("E2M3:G64:mse").name == "e2m3:g64:mse"
    assert Method.parse("mxfp6_e2m3").bits_per_weight(4096) == 6.25
    assert Method.parse("int4:g128").bits_per_weight(4096) == 4.25
    assert Method.parse("nf4:g64").bits_per_weight(4096) == 4.25
    assert Method.parse("e3m2").bits_per_weight(512) == 6 + 32 / 512
    for bad, match in [("e2m3:g0", "g0"), ("mxfp6_e2m3:g64", "block of 32"), ("nf4", "group size"),
                       ("int9", "2 <= B"), ("e9m9", "unsupported format")]:
        with pytest.raises(ValueError, match=match):
            Method.parse(bad)


def test_integer_and_nf4_baselines_from_their_definitions(gen):
    w = torch.randn(16, 256, generator=gen)
    groups = w.view(16, -1, 64)
    for bits in (4, 8):  # within a step of the value: the integer zero point may put the grid half a step off
        step = (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / (2**bits - 1)
        error = (int_rtn(groups, bits) - groups).abs()
        assert bool((error <= step * 1.01).all()) and float(error.mean()) < float(step.mean()) * 0.3
    on_grid = torch.randint(0, 16, (4, 2, 64), generator=gen).float() * 0.25 - 1.0  # already 4-bit values
    on_grid[..., 0], on_grid[..., 1] = -1.0, 2.75  # each group's min and max on the grid
    assert torch.allclose(int_rtn(on_grid, 4), on_grid, atol=1e-6)  # int4 of 4-bit weights: lossless
    out = nf4(groups)
    absmax = groups.abs().amax(-1, keepdim=True).half().float()
    levels = torch.tensor(NF4_LEVELS)
    nearest = levels[((groups / absmax)[..., None] - levels).abs().argmin(-1)] * absmax
    assert torch.equal(out, nearest)


@pytest.mark.parametrize("fmt, group_size", [("e2m3", None), ("e3m2", 32), ("mxfp6_e2m3", None)])
def test_mse_scale_search_never_loses_to_absmax(fmt, group_size, gen):
    """The search keeps the absmax scale when nothing beats it, so each group's error can only go down; on
    heavy-tailed rows it goes down overall (MX: at most equal). fake_quantize gives exactly quantize_weight's
    de-quantized values."""
    w = torch.randn(32, 128, generator=gen) * torch.rand(32, 128, generator=gen).pow(4) * 4  # heavy tails
    size = 32 if group_size or fmt.startswith("mx") else 128
    absmax_err = (fake_quantize(w, fmt, group_size) - w).view(32, -1, size).square().sum(-1)
    mse = fake_quantize(w, fmt, group_size, "mse")
    mse_err = (mse - w).view(32, -1, size).square().sum(-1)
    assert bool((mse_err <= absmax_err * (1 + 1e-6)).all())
    if not fmt.startswith("mx"):  # an MX scale is a power of two: its few candidates may all lose to absmax's
        assert float(mse_err.sum()) < float(absmax_err.sum())  # (seed 5743102743379653800: mxfp6 kept every one)
    assert torch.equal(mse, quantize_weight(w, fmt, group_size, scale_search="mse").dequantize())
    with pytest.raises(ValueError, match="scale_search"):
        quantize_weight(w, fmt, group_size, scale_search="kl")


def test_quality_table_invariants(tiny_hf):
    model, tokenizer = lm.load_causal_lm(tiny_hf / "hf")
    windows = lm.text_windows(tokenizer, lm.pydoc_text(), 32, 2)
    rows = lm.uniform_table(model, windows, ["e4m3", "e2m1", "nf4:g64"])
    names = [r.method for r in rows]
    assert names == ["float32", "e4m3", "e2m1", "nf4:g64"] and rows[0].kl == 0 and rows[0].argmax_agreement == 1
    for row in rows[1:]:
        assert row.kl > 0 and 0 <= row.argmax_agreement <= 1 and row.tokens == 2 * 31
    assert rows[1].kl < rows[2].kl  # 8 bits move the distribution less than 4
    again = lm.uniform_table(model, windows, [])  # the weights were restored
    assert again[0].perplexity == pytest.approx(rows[0].perplexity, rel=1e-6)


def test_plan_is_optimal_within_its_bits_and_keeps_fused_layers_together(gen):
    names = [f"model.layers.{i}.{part}" for i in range(2) for part in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj")]
    methods = [Method.parse(m) for m in ("e2m2", "e2m3", "e4m3")]
    shapes = {n: (64, 64 * (1 + i % 3)) for i, n in enumerate(names)}
    sens = {n: {"e2m2": 1 + float(torch.rand((), generator=gen)) * 4, "e2m3": 0.5 * float(torch.rand((),
            generator=gen)), "e4m3": 0.01} for n in names}
    units = plan.fused_units(names)
    assert len(units) == 2 * 4 and ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                                    "model.layers.0.self_attn.v_proj") in units
    total = sum(n * k for n, k in shapes.values())
    for budget in (5.4, 6.0, 6.6, 8.6):
        chosen = plan.choose(sens, shapes, methods, budget)
        assert chosen.bits_per_weight <= budget
        for unit in units:
            assert len({chosen.layers[n] for n in unit}) == 1
        best = min(  # brute force over every assignment of the units within the plan's own bits
            sum(sens[n][m.name] for u, m in zip(units, pick) for n in u)
            for pick in itertools.product(methods, repeat=len(units))
            if sum(m.bits_per_weight(shapes[n][1]) * shapes[n][0] * shapes[n][1] for u, m in zip(units, pick)
                   for n in u) / total <= chosen.bits_per_weight + 1e-9)
        assert chosen.estimated_loss == pytest.approx(best)
    with pytest.raises(ValueError, match="cheapest"):
        plan.choose(sens, shapes, methods, 4.0)


def test_plan_cli_writes_a_mixed_checkpoint_that_loads_and_generates(tiny_hf, tmp_path, capsys):
    from fp6llm.cli import main
    from fp6llm.engine import Request, load
    from fp6llm.nn import FPxLinear

    out = tmp_path / "packed"
    assert main(["plan", "--model", str(tiny_hf / "hf"), "--bits", "6", "--ctx", "32", "--windows", "2",
                 "--methods", "e2m2,e2m3,e4m3:g64", "--out", str(out)]) == 0
    meta = json.loads((out / "fp6llm.json").read_text())
    assert len(meta["plan"]) == LAYERS * 7 and all(name.startswith("layers.") for name in meta["plan"])
    engine = load(out, device="cpu", cuda_graph=False, progress=False, max_seq_len=32)
    kinds = {(m.fmt.name, m.group_size) for m in engine.model.modules() if isinstance(m, FPxLinear)}
    assert kinds == {(e["format"], e["group_size"]) for e in meta["plan"].values()}
    request = Request(engine.tokenizer.encode("def f"), 4)  # no stop ids: exactly four tokens
    engine.add([request])
    while engine.active:
        engine.step()
    assert request.finish_reason == "length" and len(request.output_ids) == 4
    ends = [i for i, token in enumerate(request.output_ids) if token in engine.stop_ids]  # generate stops there
    text = engine.tokenizer.decode(request.output_ids[:min(ends, default=4)])
    assert engine.generate(["def f"], max_new_tokens=4) == [text]
    assert main(["plan", "--model", str(tiny_hf / "hf"), "--bits", "3", "--ctx", "32", "--windows", "1",
                 "--methods", "e2m2"]) == 2
    assert "cheapest" in capsys.readouterr().err


def test_eval_lm_cli_prints_the_table_and_refuses_bad_methods(tiny_hf, tmp_path, capsys):
    from fp6llm.cli import main

    out = tmp_path / "rows.json"
    assert main(["eval-lm", "--model", str(tiny_hf / "hf"), "--ctx", "32", "--windows", "1", "--methods",
                 "mxfp6_e2m3,int8", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mxfp6_e2m3" in printed and "int8" in printed
    assert [r["method"] for r in json.loads(out.read_text())["rows"]] == ["float32", "mxfp6_e2m3", "int8"]
    assert main(["eval-lm", "--model", str(tiny_hf / "hf"), "--methods", "e2m3:g7x"]) == 2
    assert "g7x" in capsys.readouterr().err


class CharTokenizer:
    """One id per character (ord), optionally starting every text with BOS 0, as Gemma's tokenizer does."""

    def __init__(self, adds_bos: bool):
        self.bos_token_id, self.adds_bos = 0, adds_bos

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text]
        return {"input_ids": ([0] if self.adds_bos and add_special_tokens else []) + ids}


def test_text_windows_from_either_end_and_bos():
    text = "".join(chr(65 + i % 26) for i in range(100))
    last = lm.text_windows(CharTokenizer(False), text, 10, 3)
    assert last.shape == (3, 10) and last[-1, -1] == ord(text[-1]) and last[0, 0] == ord(text[70])
    first = lm.text_windows(CharTokenizer(False), text, 10, 3, from_end=False)
    assert first[0, 0] == ord(text[0]) and first[-1, -1] == ord(text[29])
    with_bos = lm.text_windows(CharTokenizer(True), text, 10, 3)
    assert bool((with_bos[:, 0] == 0).all()) and with_bos[-1, -1] == ord(text[-1]) and with_bos[0, 1] == ord(text[73])
    with pytest.raises(ValueError, match="not enough"):
        lm.text_windows(CharTokenizer(False), text, 60, 2)
