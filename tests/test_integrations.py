"""integrations/: transformers' quantizer (quant_method "fp6llm") and the lm-evaluation-harness model.

Tolerance (quantize while loading): float32 logits within 1e-4 (max abs) of fp6llm's own model loaded from the same
checkpoint in the same format. Both quantize the same weights with quantize_weight, so the packed buffers are
asserted bit-identical; the logits differ only by the order of float32 operations (~1e-7 in practice), as in
test_models.py. Save / load round trips are asserted exact: same tensors, same dtypes, same logits.
"""

import json
import math
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fp6llm import LAYOUT_VERSION  # noqa: E402
from fp6llm.integrations.hf import FPxConfig  # noqa: E402
from fp6llm.models import load_hf  # noqa: E402
from fp6llm.nn import FPxLinear  # noqa: E402
from helpers import seed_of, seeded  # noqa: E402
from test_models import ATOL, HF_CASES, VOCAB, run, save_hf_model  # noqa: E402

AutoModel = transformers.AutoModelForCausalLM
# (format, group size) per case: per-channel FP6 for most, grouped FP4 (float16 group scales) for two.
CASE_FORMATS = {"llama3": ("e3m2", None), "llama-bias-tied": ("e2m1", 32), "mistral-window": ("e3m2", None),
                "qwen2": ("e2m2", None), "opt": ("e3m2", None), "opt-350m-style": ("e2m1", 32)}


def load_quantizing(path, fmt="e3m2", group_size=None, dtype=torch.float32, **kwargs):
    return AutoModel.from_pretrained(path, quantization_config=FPxConfig(fmt, group_size, **kwargs), dtype=dtype)


def fpx_layers(model) -> dict:
    """{name without the transformers prefix: FPxLinear} (fp6llm's names drop "model." / "model.decoder.")."""
    return {name.removeprefix("model.").removeprefix("decoder."): m for name, m in model.named_modules()
            if isinstance(m, FPxLinear)}


# fp6llm's decoders may fuse projections (one Linear whose rows are its parts'); transformers' never do.
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def buffers_of(layers: dict, name: str) -> dict:
    """The FPxLinear buffers of ``name`` in ``layers``, or of its parts' rows stacked for a fused name (parts of
    whole 16-row tiles here, so that stacking the packed planes is stacking the rows)."""
    if name in layers:
        return layers[name].state_dict()
    parent, _, last = name.rpartition(".")
    parts = [layers[f"{parent}.{part}"].state_dict() for part in FUSED_PARTS[last]]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


@torch.no_grad()
@pytest.mark.parametrize("case", list(HF_CASES))
def test_quantize_while_loading_equals_fp6llm(case, tmp_path, gen):
    fmt, group_size = CASE_FORMATS[case]
    save_hf_model(case, tmp_path, seed=seed_of(gen))
    hf = load_quantizing(tmp_path, fmt, group_size)
    ours = load_hf(tmp_path, fmt=fmt, group_size=group_size, device="cpu", progress=False)
    theirs, mine = fpx_layers(hf), fpx_layers(ours)
    assert len(mine) > 0 and not isinstance(hf.lm_head, FPxLinear)
    for name, layer in mine.items():  # the same codes and scales, bit for bit
        expected = buffers_of(theirs, name)
        assert layer.state_dict().keys() == expected.keys(), name
        for key, tensor in layer.state_dict().items():
            assert torch.equal(tensor, expected[key]), f"{name}.{key}"
    tokens = torch.randint(0, VOCAB, (2, 16), generator=gen)
    assert (hf(tokens).logits - run(ours, tokens)).abs().max() <= ATOL


@torch.no_grad()
@pytest.mark.parametrize("case, dtype", [("llama-bias-tied", torch.bfloat16), ("opt", torch.float32)])
def test_save_pretrained_round_trip_is_exact(case, dtype, tmp_path, gen):
    """Also in bfloat16: the packed scales keep their own dtype (float16 group scales here), the rest is bf16."""
    fmt, group_size = CASE_FORMATS[case]
    save_hf_model(case, tmp_path / "float", seed=seed_of(gen))
    model = load_quantizing(tmp_path / "float", fmt, group_size, dtype)
    assert model.dtype == dtype and {m.scales.dtype for m in fpx_layers(model).values()} <= {torch.float32,
                                                                                             torch.float16}
    model.save_pretrained(tmp_path / "packed")
    config = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]
    assert config == {"quant_method": "fp6llm", "format": fmt, "group_size": group_size,
                      "layout_version": LAYOUT_VERSION, "modules_to_not_convert": ["lm_head"]}
    loaded = AutoModel.from_pretrained(tmp_path / "packed")  # no quantization_config: config.json has it
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys() and not any(k.endswith("proj.weight") for k in after)
    for key, tensor in before.items():
        assert tensor.dtype == after[key].dtype and torch.equal(tensor, after[key]), key
    tokens = torch.randint(0, VOCAB, (2, 12), generator=gen)
    assert torch.equal(model(tokens).logits, loaded(tokens).logits)


@torch.no_grad()
def test_generate_is_greedy_decoding_of_fp6llm_logits(tmp_path, gen):
    """transformers' generate (its own KV cache, greedy) picks an argmax of fp6llm's full-forward logits at every
    step."""
    save_hf_model("qwen2", tmp_path, seed=seed_of(gen))
    hf = load_quantizing(tmp_path)
    ours = load_hf(tmp_path, fmt="e3m2", device="cpu", progress=False)
    prompt = torch.randint(0, VOCAB, (1, 5), generator=gen)
    # an explicit mask: without one, a prompt that starts with token 0 (= pad_token_id) would be taken for left
    # padding and masked (seed 2379562164143160620)
    generated = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                            pad_token_id=0)
    assert generated.shape == (1, 13) and torch.equal(generated[:, :5], prompt)
    logits = run(ours, generated[:, :-1])[0, 4:]  # fp6llm's predictions of the 8 new tokens
    picked = logits.gather(1, generated[0, 5:, None])[:, 0]
    assert (logits.max(dim=-1).values - picked <= ATOL).all()  # each is the argmax (up to a near-tie within ATOL)


def test_skipped_modules_stay_float(tmp_path, gen):
    save_hf_model("llama3", tmp_path, seed=seed_of(gen))
    model = load_quantizing(tmp_path, modules_to_not_convert=["lm_head", "down_proj", "model.layers.0.*"])
    layers = model.model.layers
    assert type(layers[0].self_attn.q_proj) is torch.nn.Linear and type(layers[1].mlp.down_proj) is torch.nn.Linear
    assert isinstance(layers[1].self_attn.q_proj, FPxLinear) and isinstance(layers[1].mlp.up_proj, FPxLinear)
    model.save_pretrained(tmp_path / "packed")
    loaded = AutoModel.from_pretrained(tmp_path / "packed")
    assert type(loaded.model.layers[1].mlp.down_proj) is torch.nn.Linear
    assert isinstance(loaded.model.layers[1].mlp.up_proj, FPxLinear)


def test_config_errors(tmp_path, gen):
    with pytest.raises(ValueError, match="e9m9"):
        FPxConfig("e9m9")
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        FPxConfig("e3m2", group_size=0)
    with pytest.raises(TypeError, match=r"unknown arguments \['groupsize'\]"):
        FPxConfig("e3m2", groupsize=64)
    with pytest.raises(ValueError, match="quant_method 'fp6llm', got 'gptq'"):
        FPxConfig.from_dict({"quant_method": "gptq", "format": "e3m2"})
    save_hf_model("llama3", tmp_path / "float", seed=seed_of(gen))
    with pytest.raises(ValueError, match="group_size 48 does not divide in_features 128 of layer "
                                         "model.layers.0.mlp.down_proj"):
        load_quantizing(tmp_path / "float", "e3m2", 48)
    load_quantizing(tmp_path / "float").save_pretrained(tmp_path / "packed")
    config_path = tmp_path / "packed" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["layout_version"] = 99
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="layout version 99"):
        AutoModel.from_pretrained(tmp_path / "packed")


@torch.no_grad()
def test_allocator_warm_up_is_sized_to_the_quantized_model(tmp_path, gen, monkeypatch):
    """transformers reserves GPU memory for the model before loading it (caching_allocator_warmup: one empty tensor
    of the bytes its quantizer says the parameters will take). Captured here on the CPU at the point it runs, for a
    GPU: within 2 % of the bytes the loaded model holds, not the float16 bytes (transformers 5.17 counted those)."""
    import transformers.modeling_utils as modeling_utils
    from transformers.modeling_utils import get_total_byte_count
    sized = {}

    def warm_up(model, device_map, quantizer):  # the same arguments on a GPU, their devices said to be one
        sized.update(get_total_byte_count(model, {name: torch.device("cuda", 0) for name in device_map}, quantizer))

    monkeypatch.setattr(modeling_utils, "caching_allocator_warmup", warm_up)
    float_model = save_hf_model("llama3", tmp_path, seed=seed_of(gen))
    float16 = sum(p.numel() * 2 for p in float_model.parameters())
    for fmt, group_size in (("e3m2", None), ("e2m1", 32)):
        sized.clear()
        hf = AutoModel.from_pretrained(tmp_path, quantization_config=FPxConfig(fmt, group_size), dtype=torch.float16,
                                       device_map="cpu")
        held = sum(t.numel() * t.element_size() for t in hf.state_dict().values())
        (predicted,) = sized.values()
        # (the float16 count is far off even here, where the float embeddings and lm_head are half the bytes)
        assert abs(predicted - held) <= 0.02 * held < 0.1 * (float16 - held), (fmt, predicted, held, float16)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs a CUDA device (compiled Triton: TRITON_INTERPRET=0)")


@pytest.mark.gpu
@needs_cuda
@torch.no_grad()
def test_quantizing_while_loading_on_cuda_peaks_near_the_quantized_size(tmp_path, gen):
    """device_map="cuda": each weight is read, quantized and dropped before the next, so the peak is the quantized
    model plus one weight's temporaries (quantize_weight's float32 copies, codes, packing), far below the float16
    model. A ~0.8 B-parameter random Llama: 1.6 GB in float16, ~0.6 GB in FP6."""
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=16,
                                      intermediate_size=5632)
    def build():  # the seed is drawn from gen (a CPU generator) outside the CUDA device context
        with torch.device("cuda"):
            return transformers.LlamaForCausalLM(config).half()

    model = seeded(gen, build)
    model.save_pretrained(tmp_path)
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    hf = AutoModel.from_pretrained(tmp_path, quantization_config=FPxConfig("e3m2"), dtype=torch.float16,
                                   device_map="cuda")
    peak = torch.cuda.max_memory_allocated() - start
    quantized = sum(t.numel() * t.element_size() for t in hf.state_dict().values())
    largest = max(m.in_features * m.out_features for m in fpx_layers(hf).values()) * 4  # bytes as float32
    print(f"peak {peak / 2**20:.0f} MiB, quantized {quantized / 2**20:.0f} MiB, float16 {float_bytes / 2**20:.0f} "
          f"MiB, largest weight in float32 {largest / 2**20:.0f} MiB")
    assert peak < quantized + 8 * largest and peak < 0.75 * float_bytes
    logits = hf(torch.randint(0, 256, (2, 8), generator=gen).cuda()).logits  # through the Triton kernel
    assert logits.shape == (2, 8, 256) and bool(torch.isfinite(logits).all())


# ---- lm-evaluation-harness ---------------------------------------------------------------------------------------
# lm-eval is not in the test extra (it pulls datasets, pyarrow, pandas: ~440 MB, ~50 s to install): these tests skip
# without it. `pip install -e .[lm-eval]` runs them.

LM_ARGS = dict(pretrained="random:tiny-llama", format="e3m2", max_length=32)  # a byte tokenizer: ids = BOS + bytes


def random_text(gen, length: int) -> str:
    return "".join(chr(c) for c in torch.randint(32, 127, (length,), generator=gen).tolist())


def nll(model, rows: list) -> float:
    """fp6llm's own perplexity code: summed negative log-likelihood of equal-length windows, each from its start."""
    from fp6llm.evals.perplexity import score
    return score(model, torch.tensor(rows))[0]


@pytest.fixture(scope="module")
def lm():
    pytest.importorskip("lm_eval")
    from fp6llm.integrations.lmeval import FP6LLM
    return FP6LLM(**LM_ARGS, batch_size=3)


def test_lm_eval_rolling_and_loglikelihood_equal_fp6llm_scores(lm, gen):
    from lm_eval.api.instance import Instance
    texts = [random_text(gen, 3 * 32), random_text(gen, 20)]  # three windows of 32 predictions; one short window
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)])
    long_ids, short_ids = (lm.tok_encode(t) for t in texts)
    # lm-eval's rolling windows: each predicts 32 tokens and sees the token before them (BOS for the first)
    expected = nll(lm.model, [long_ids[32 * k:32 * k + 33] for k in range(3)])
    assert rolling[0] == pytest.approx(-expected, rel=1e-5)
    assert rolling[1] == pytest.approx(-nll(lm.model, [short_ids]), rel=1e-5)

    context, continuation = texts[1][:12], texts[1][12:]
    [(logprob, _)] = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)])
    whole, head = lm.tok_encode(context + continuation), lm.tok_encode(context)
    assert logprob == pytest.approx(nll(lm.model, [head]) - nll(lm.model, [whole]), rel=1e-4)


def test_lm_eval_generate_until_is_the_engines_greedy_text_cut_at_stop(lm, gen):
    from lm_eval.api.instance import Instance

    from fp6llm.engine import Engine
    prompts = [random_text(gen, 6), random_text(gen, 9)]
    engine = Engine(lm.model, lm.fp6llm_tokenizer, lm.batch_size, lm.max_length)  # the engine generate_until makes
    try:
        full = engine.generate(prompts, 10)
    finally:
        engine.close()
    stop = full[1][len(full[1]) // 2:][:2] or "\x00"  # a piece of the second completion (never empty)
    requests = [Instance("generate_until", {}, (p, {"until": [stop], "max_gen_toks": 10}), i)
                for i, p in enumerate(prompts)]
    assert lm.generate_until(requests) == [text.split(stop)[0] for text in full]


def test_lm_eval_is_greedy_says_whether_each_token_is_the_argmax(lm, gen):
    from fp6llm.evals.perplexity import score
    context = lm.tok_encode(random_text(gen, 8))
    ids = list(context)
    for _ in range(5):  # greedy decoding by full forwards: the argmax after ids (a dummy last token is not read)
        ids.append(int(score(lm.model, torch.tensor([ids + [0]]))[1][0, -1]))
    greedy = ids[len(context):]
    other = greedy[:-1] + [(greedy[-1] + 1) % 512]
    [(_, is_greedy), (_, other_is_greedy)] = lm._loglikelihood_tokens([(None, context, greedy),
                                                                       (None, context, other)])
    assert is_greedy and not other_is_greedy


@pytest.mark.parametrize("args, message", [(dict(batch_size="x"), "batch_size must be a positive int or auto"),
                                           (dict(dtype="float8"), "dtype must be one of float16"),
                                           (dict(max_length=4096), r"max_length 4096 must be in 2\.\.512"),
                                           (dict(format="e9m9"), "e9m9")])
def test_lm_eval_model_args_errors(args, message):
    pytest.importorskip("lm_eval")
    from fp6llm.integrations.lmeval import FP6LLM
    with pytest.raises(ValueError, match=message):
        FP6LLM(pretrained="random:tiny-llama", **args)

@pytest.mark.slow
def test_lm_eval_cli_runs_a_local_task_at_fp6llm_perplexity(tmp_path, gen):
    """`lm_eval --model fp6llm` (through python -m fp6llm.integrations.lmeval) on a YAML task over a local JSONL file:
    its byte perplexity is fp6llm's own perplexity of the same texts (a byte tokenizer: one token per byte)."""
    pytest.importorskip("lm_eval")
    import subprocess
    import sys

    from fp6llm.models import build_random
    texts = [random_text(gen, n) for n in (17, 30, 25)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "task.yaml").write_text(
        "task: fp6llm_local_text\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'docs.jsonl'}\ntest_split: test\noutput_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n  - metric: byte_perplexity\n")
    args = ",".join(f"{k}={v}" for k, v in LM_ARGS.items())
    subprocess.run([sys.executable, "-m", "fp6llm.integrations.lmeval", "--model", "fp6llm", "--model_args", args,
                    "--tasks", "fp6llm_local_text", "--include_path", str(tmp_path), "--device", "cpu",
                    "--batch_size", "4", "--output_path", str(tmp_path / "out")], check=True, capture_output=True,
                   env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    [results] = (tmp_path / "out").glob("*/results_*.json")
    measured = json.loads(results.read_text())["results"]["fp6llm_local_text"]["byte_perplexity,none"]
    model = build_random("tiny-llama", fmt="e3m2", device="cpu", progress=False)  # random:tiny-llama's weights
    from fp6llm.engine import ByteTokenizer
    total = sum(nll(model, [ByteTokenizer(512).encode(t)]) for t in texts)
    assert measured == pytest.approx(math.exp(total / sum(len(t) for t in texts)), rel=1e-5)
