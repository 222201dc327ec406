"""models/gemma3.py against transformers' Gemma3ForCausalLM on the same random weights.

The small configs have local (sliding-window) layers before and after a global one, a window shorter than the
sequences, GQA, a query_pre_attn_scalar other than head_dim and (in one case) final logit soft-capping and linear
RoPE scaling of the global layers, so that each of Gemma's differences from Llama is exercised. Tolerances: float32
logits within 1e-4 (max abs) of transformers' eager float32 forward (both compute the same float32 operations in
another order: ~1e-6 in practice); e3m2 weights within 0.3 of the float logits in relative Frobenius error
(measured 0.15-0.2 over seeds: Gemma's post-norms rescale each small attention and MLP output to O(1), rounding
error and all, where Llama's tiny configs see ~0.05; a wrong model is off by O(1)).
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fp6llm.engine import Engine, Request  # noqa: E402
from fp6llm.models import ModelConfig, build_model, build_random, load_hf, quantize_checkpoint  # noqa: E402
from fp6llm.models.parallel import TensorParallel, apply_tensor_parallel  # noqa: E402
from fp6llm.nn import FPxLinear  # noqa: E402
from helpers import seed_of, seeded  # noqa: E402

ATOL = 1e-4
QUANTIZED_RTOL = 0.3
VOCAB = 256
SLIDING, FULL = "sliding_attention", "full_attention"
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=6,
             query_pre_attn_scalar=24, layer_types=[SLIDING, SLIDING, FULL, SLIDING])
CASES = {
    "plain": SMALL,
    "softcap-linear-rope": dict(SMALL, final_logit_softcapping=3.0, rope_parameters={
        FULL: {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
        SLIDING: {"rope_type": "default", "rope_theta": 500.0}}),
}


def randomized(model):
    """``model`` in eval mode with its vectors (norms: transformers starts them at zero) made random too."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def save_gemma3(kwargs: dict, path, gen):
    """transformers' Gemma3ForCausalLM of config ``kwargs`` with random weights, saved as safetensors; returns it."""
    config = transformers.Gemma3TextConfig(**kwargs, attn_implementation="eager")
    model = seeded(gen, lambda: randomized(transformers.Gemma3ForCausalLM(config)))
    model.save_pretrained(path, safe_serialization=True)
    return model


@torch.no_grad()
def run(model, tokens):
    model.setup_caches(tokens.shape[0], 32)
    return model(tokens, torch.arange(tokens.shape[1]).expand(*tokens.shape))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path, gen):
    hf = save_gemma3(CASES[case], tmp_path, gen)
    tokens = torch.randint(0, VOCAB, (2, 20), generator=gen)  # 20 > sliding_window: the window masks
    with torch.no_grad():
        expected = hf(tokens).logits
    model = load_hf(tmp_path, fmt="fp32", device="cpu", progress=False)
    assert type(model).__module__ == "fp6llm.models.gemma3"
    assert model.config.layer_types == tuple(CASES[case]["layer_types"])
    ours = run(model, tokens)
    assert ours.dtype == torch.float32 and ours.shape == expected.shape
    assert (ours - expected).abs().max() <= ATOL


def test_the_multimodal_checkpoints_text_decoder_matches_transformers(tmp_path, gen):
    """model_type gemma3 (Gemma3ForConditionalGeneration, a vision tower of its own layers beside the decoder):
    its text_config and language_model tensors load, and text-only logits equal transformers'."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=2, image_size=28,
                  patch_size=14)  # more layers than the decoder: they must not be counted as its
    config = transformers.Gemma3Config(text_config=dict(SMALL), vision_config=vision, mm_tokens_per_image=4,
                                       attn_implementation="eager")
    hf = seeded(gen, lambda: randomized(transformers.Gemma3ForConditionalGeneration(config)))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    tokens = torch.randint(0, VOCAB, (2, 20), generator=gen)
    with torch.no_grad():
        expected = hf(input_ids=tokens).logits
    model = load_hf(tmp_path, fmt="fp32", device="cpu", progress=False)
    assert model.config.n_layers == SMALL["num_hidden_layers"]
    assert (run(model, tokens) - expected).abs().max() <= ATOL


def test_greedy_generation_matches_transformers(tmp_path, gen):
    """Engine's greedy tokens equal transformers' generate, past the window, for two prompts batched together."""
    hf = save_gemma3(SMALL, tmp_path, gen)
    model = load_hf(tmp_path, fmt="fp32", device="cpu", progress=False)
    engine = Engine(model, None, max_batch_size=2, max_seq_len=40)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (5, 9)]
    requests = [Request(prompt, 12) for prompt in prompts]
    engine.add(requests)
    while engine.active:
        engine.step()
    for prompt, request in zip(prompts, requests):
        with torch.no_grad():
            ids = torch.tensor([prompt])  # an explicit mask: a leading token 0 (= pad_token_id) is not padding
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert request.output_ids == out[0, len(prompt):].tolist()


@torch.no_grad()
def test_quantized_logits_are_close_to_float(tmp_path, gen):
    """e3m2 weights within QUANTIZED_RTOL of the float logits, and e3m4's (two more mantissa bits) at least twice
    closer: the error is the weights' rounding, not a path that only quantized models take."""
    save_gemma3(CASES["softcap-linear-rope"], tmp_path, gen)
    tokens = torch.randint(0, VOCAB, (1, 20), generator=gen)
    reference = run(load_hf(tmp_path, fmt="fp32", device="cpu", progress=False), tokens)
    errors = {}
    for fmt in ("e3m2", "e3m4"):
        model = load_hf(tmp_path, fmt=fmt, device="cpu", progress=False)
        assert isinstance(model.layers[0].self_attn.qkv_proj, FPxLinear)
        assert isinstance(model.layers[2].mlp.down_proj, FPxLinear)
        errors[fmt] = ((run(model, tokens) - reference).norm() / reference.norm()).item()
    assert 0 < errors["e3m2"] <= QUANTIZED_RTOL
    assert errors["e3m4"] <= errors["e3m2"] / 2


@torch.no_grad()
def test_packed_checkpoint_loads_the_quantized_model(tmp_path, gen):
    """fp6llm quantize's packed checkpoint (its fp6llm.json holds the layer types) gives the logits of quantizing
    while loading, exactly (norms and embeddings kept in float32)."""
    save_gemma3(CASES["softcap-linear-rope"], tmp_path / "hf", gen)
    quantize_checkpoint(tmp_path / "hf", tmp_path / "packed", "e3m2", progress=False, dtype=torch.float32)
    tokens = torch.randint(0, VOCAB, (1, 20), generator=gen)
    packed = load_hf(tmp_path / "packed", device="cpu", progress=False)
    assert packed.config == load_hf(tmp_path / "hf", fmt="e3m2", device="cpu", progress=False).config
    torch.testing.assert_close(run(packed, tokens),
                               run(load_hf(tmp_path / "hf", fmt="e3m2", device="cpu", progress=False), tokens),
                               atol=0, rtol=0)


@torch.no_grad()
def test_bfloat16_is_as_close_to_float32_as_transformers_bfloat16(tmp_path, gen):
    """In bfloat16 our logits are no further from transformers' float32 ones than twice transformers' own
    bfloat16 logits are (relative Frobenius error: both ~0.015 measured)."""
    hf = save_gemma3(CASES["softcap-linear-rope"], tmp_path, gen)
    tokens = torch.randint(0, VOCAB, (1, 20), generator=gen)
    expected = hf(tokens).logits
    theirs = hf.to(torch.bfloat16)(tokens).logits.float()
    model = load_hf(tmp_path, fmt="bf16", dtype=torch.bfloat16, device="cpu", progress=False)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    ours = run(model, tokens)
    error = lambda logits: ((logits - expected).norm() / expected.norm()).item()  # noqa: E731
    assert error(ours) <= 2 * error(theirs)


def test_each_tensor_parallel_rank_loads_what_slicing_the_whole_model_gives(tmp_path, gen):
    """Per-rank loading of a Gemma-3 checkpoint (float32, e3m2 quantized per rank) is bit-identical to
    apply_tensor_parallel over the whole model: its TENSOR_PARALLEL and FUSED (llama's) slice it, q_norm and k_norm
    stay whole. Shapes: 2 of 4 heads x 64 and 128 of 256 hidden units per rank, whole 128-column tiles."""
    save_gemma3(dict(SMALL, hidden_size=128, head_dim=64, intermediate_size=256), tmp_path, gen)
    for rank in range(2):
        for fmt in ("fp32", "e3m2"):
            part = load_hf(tmp_path, fmt, device="cpu", progress=False, tp=TensorParallel(rank, 2))
            whole = apply_tensor_parallel(load_hf(tmp_path, fmt, device="cpu", progress=False), rank, 2)
            ours, theirs = part.state_dict(), whole.state_dict()
            assert ours.keys() == theirs.keys()
            assert all(torch.equal(tensor, theirs[name]) for name, tensor in ours.items())
            assert part.config.n_heads == 2 and part.layers[0].self_attn.q_norm.weight.shape == (64,)


def test_config_round_trips_and_checks_layer_types(tmp_path):
    hf = {"model_type": "gemma3_text", **SMALL, "sliding_window_pattern": 2}
    del hf["layer_types"]  # configs written before layer_types: every pattern-th layer is global
    config = ModelConfig.from_hf(hf)
    assert config.layer_types == (SLIDING, FULL, SLIDING, FULL)
    assert config.local_rope_theta == 10000.0 and config.rope_theta == 1000000.0
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert sum(p.numel() for p in build_model(config, "meta").parameters()) > 0
    with pytest.raises(ValueError, match="layer_types"):
        ModelConfig.from_hf({**hf, "layer_types": [SLIDING, "chunked_attention", FULL, FULL]})
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        ModelConfig.from_hf({**hf, "attn_logit_softcapping": 50.0})
    with pytest.raises(ValueError, match="sliding_window=None"):
        ModelConfig.from_hf({**hf, "sliding_window": None})


def test_named_configs():
    """gemma-3-270m has the real model's 268.1M parameters (tied embeddings counted once; 167.8M of them the
    262144-token embedding); tiny-gemma3 runs through the Engine, quantized, from random weights."""
    model = build_model(ModelConfig.from_name("gemma-3-270m"), "meta")
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(268.1, abs=0.05)
    assert [layer.self_attn.sliding_window for layer in model.layers[:6]] == [512] * 5 + [None]


def test_random_tiny_gemma3_generates_what_its_full_forward_argmaxes(gen):
    model = build_random("tiny-gemma3", fmt="e3m2", device="cpu", seed=seed_of(gen), progress=False)
    prompt = torch.randint(0, 512, (11,), generator=gen).tolist()
    engine = Engine(model, None, max_batch_size=1, max_seq_len=32)
    request = Request(prompt, 6)
    engine.add([request])
    while engine.active:
        engine.step()
    sequence = torch.tensor([prompt + request.output_ids])
    logits = run(model, sequence)[0, len(prompt) - 1:-1]
    assert request.output_ids == logits.argmax(-1).tolist()

