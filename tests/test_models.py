"""models/: our decoders against transformers' on the same random weights, per-row positions, the KV cache, configs.

Tolerance: float32 logits within 1e-4 (max abs) of transformers' eager float32 forward. Logits are O(1) here, and
both sides compute the same float32 operations in a slightly different order, so agreement is ~1e-7 in practice.
Weights and tokens are fresh each run, drawn from the ``gen`` fixture (its seed is printed; FP6LLM_TEST_SEED replays).
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fp6llm.models import NAMED_CONFIGS, ModelConfig, build_model, build_random, load_hf  # noqa: E402
from fp6llm.nn import FPxLinear, quantize_model  # noqa: E402
from helpers import seed_of  # noqa: E402

ATOL = 1e-4
VOCAB = 256
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)

# name -> (transformers config class, model class, config kwargs): one case per feature the loader must map.
HF_CASES = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(SMALL, intermediate_size=128, num_key_value_heads=2,
                                                       rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)),
    "llama-bias-tied": ("LlamaConfig", "LlamaForCausalLM", dict(SMALL, intermediate_size=96, attention_bias=True,
                                                                mlp_bias=True, tie_word_embeddings=True)),
    "mistral-window": ("MistralConfig", "MistralForCausalLM",
                       dict(SMALL, intermediate_size=128, num_key_value_heads=1, head_dim=32, sliding_window=8)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(SMALL, intermediate_size=128, num_key_value_heads=2)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(SMALL, ffn_dim=128, max_position_embeddings=64)),
    "opt-350m-style": ("OPTConfig", "OPTForCausalLM",
                       dict(SMALL, ffn_dim=128, max_position_embeddings=64, word_embed_proj_dim=32,
                            do_layer_norm_before=False)),
}


def save_hf_model(case: str, path, seed: int = 0, **save_kwargs):
    """Build transformers' model of ``case`` with seeded random weights, save it as safetensors; return it.
    transformers initializes from torch's global generator: seeded here, restored after."""
    config_cls, model_cls, kwargs = HF_CASES[case]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        config = getattr(transformers, config_cls)(**kwargs, attn_implementation="eager")
        model = getattr(transformers, model_cls)(config).eval()
        with torch.no_grad():  # transformers initializes biases and norms to constants; make them random too
            for param in model.parameters():
                if param.dim() == 1:
                    param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(path, safe_serialization=True, **save_kwargs)
    return model


def positions(batch: int, length: int) -> torch.Tensor:
    return torch.arange(length).expand(batch, length)


@torch.no_grad()
def run(model, tokens, input_pos=None, max_seq_len=32):
    model.setup_caches(tokens.shape[0], max_seq_len)
    return model(tokens, positions(*tokens.shape) if input_pos is None else input_pos)


@pytest.mark.parametrize("case", list(HF_CASES))
def test_logits_match_transformers(case, tmp_path, gen):
    hf = save_hf_model(case, tmp_path, seed_of(gen))
    tokens = torch.randint(0, VOCAB, (2, 24), generator=gen)
    with torch.no_grad():
        expected = hf(tokens).logits
    ours = run(load_hf(tmp_path, fmt="fp32", device="cpu", progress=False), tokens)
    assert ours.dtype == torch.float32 and ours.shape == expected.shape
    assert (ours - expected).abs().max() <= ATOL


def test_sharded_checkpoint_loads_the_same(tmp_path, gen):
    hf = save_hf_model("llama3", tmp_path, seed_of(gen), max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) >= 2
    tokens = torch.randint(0, VOCAB, (1, 12), generator=gen)
    with torch.no_grad():
        expected = hf(tokens).logits
    assert (run(load_hf(tmp_path, fmt="fp32", progress=False), tokens) - expected).abs().max() <= ATOL


@pytest.fixture(params=["tiny-llama", "tiny-opt"])
def tiny(request, gen):
    return build_random(request.param, fmt="fp32", device="cpu", seed=seed_of(gen), progress=False)


@torch.no_grad()
def test_padded_batch_matches_each_prompt_alone(tiny, gen):
    """Right-padded prompts of lengths 5 and 9 in one batch: each row's last-token logits as if it ran alone."""
    prompts = [torch.randint(0, VOCAB, (5,), generator=gen), torch.randint(0, VOCAB, (9,), generator=gen)]
    batch = torch.zeros(2, 9, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        batch[row, : len(prompt)] = prompt
    logits = run(tiny, batch)
    last = torch.tensor([[4], [8]])
    tiny.setup_caches(2, 32)
    torch.testing.assert_close(tiny(batch, positions(2, 9), logits_at=last),
                               logits.gather(1, last[:, :, None].expand(-1, -1, logits.shape[-1])))
    for row, prompt in enumerate(prompts):
        alone = run(tiny, prompt[None])
        torch.testing.assert_close(logits[row, len(prompt) - 1], alone[0, -1], atol=1e-5, rtol=0)


@torch.no_grad()
def test_incremental_decode_matches_full_forward(tiny, gen):
    """Two rows at different positions decode one token at a time (T=1); each step equals the full forward."""
    lengths, steps = (3, 6), 5
    seqs = torch.randint(0, VOCAB, (2, max(lengths) + steps), generator=gen)
    full = [run(tiny, seqs[row, : lengths[row] + steps][None])[0] for row in range(2)]
    tiny.setup_caches(2, 32)
    prompt = seqs[:, : max(lengths)].clone()
    prompt[0, lengths[0]:] = 0  # right padding: its junk K/V is masked, then overwritten by decode
    tiny(prompt, positions(2, max(lengths)))
    for step in range(steps):
        pos = torch.tensor([[lengths[0] + step], [lengths[1] + step]])
        logits = tiny(seqs.gather(1, pos), pos)
        for row in range(2):
            torch.testing.assert_close(logits[row, 0], full[row][lengths[row] + step], atol=1e-5, rtol=0)


@torch.no_grad()
def test_reused_slot_forgets_the_previous_sequence(tiny, gen):
    """Continuous batching: a new, shorter sequence in a used cache row gives the same logits as a fresh cache."""
    old, new = torch.randint(0, VOCAB, (1, 12), generator=gen), torch.randint(0, VOCAB, (1, 4), generator=gen)
    fresh = run(tiny, new)
    tiny.setup_caches(1, 32)
    tiny(old, positions(1, 12))
    torch.testing.assert_close(tiny(new, positions(1, 4)), fresh, atol=1e-5, rtol=0)


@torch.no_grad()
def test_random_quantized_model_is_quantize_model_of_the_float_one(gen):
    """build_random quantizes layer by layer exactly as quantize_model would the same float32 weights."""
    seed = seed_of(gen)
    quantized = build_random("tiny-llama", fmt="e3m2", device="cpu", seed=seed, progress=False)
    reference = quantize_model(build_random("tiny-llama", fmt="fp32", device="cpu", seed=seed, progress=False),
                               progress=False)
    assert isinstance(quantized.layers[0].mlp.down_proj, FPxLinear)
    assert not isinstance(quantized.lm_head, FPxLinear)
    expected = reference.state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in quantized.state_dict().items())


@pytest.mark.parametrize("name, billions", [("llama-2-7b", 6.74), ("llama-2-13b", 13.02), ("llama-2-70b", 68.98),
                                            ("llama-3-8b", 8.03), ("opt-30b", 29.97)])
def test_named_configs_have_the_real_sizes(name, billions):
    model = build_model(ModelConfig.from_name(name), "meta")
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.01)


def test_from_hf_errors():
    with pytest.raises(ValueError, match=r"'gpt2'.*llama, mistral, qwen2, opt"):
        ModelConfig.from_hf({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_hf(dict(model_type="llama", vocab_size=8, hidden_size=8, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=8, max_position_embeddings=8,
                                 rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="unknown model name 'llama-9b'"):
        ModelConfig.from_name("llama-9b")
    assert set(NAMED_CONFIGS) >= {"llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "opt-30b"}


def test_from_hf_reads_transformers_4_rope_spelling():
    old_style = {**LLAMA3_ROPE, "rope_type": None, "type": "llama3"}
    config = ModelConfig.from_hf(dict(model_type="llama", vocab_size=8, hidden_size=8, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=8, max_position_embeddings=8,
                                      rope_theta=500000.0, rope_scaling=old_style))
    assert config.rope_theta == 500000.0 and config.rope_scaling["rope_type"] == "llama3"


@pytest.mark.slow
@torch.no_grad()
def test_compiled_decode_matches_eager(gen):
    """torch.compile(fullgraph=True) of a T=1 decode step: no graph breaks, same logits as eager."""
    model = build_random("tiny-llama", fmt="e3m2", device="cpu", seed=seed_of(gen), progress=False)
    tokens, pos = torch.randint(0, VOCAB, (2, 6), generator=gen), positions(2, 6)
    step_tokens, step_pos = torch.randint(0, VOCAB, (2, 1), generator=gen), torch.tensor([[6], [3]])
    model.setup_caches(2, 16)
    model(tokens, pos)
    eager = model(step_tokens, step_pos)
    model.setup_caches(2, 16)
    model(tokens, pos)
    compiled = torch.compile(model, fullgraph=True)(step_tokens, step_pos)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_norms_hand_fp6_layers_x_in_the_wgmma_order_without_changing_logits(gen, monkeypatch, arch):
    """Where an FP6 layer takes x in the wgmma kernel's k order (takes_ordered_x forced on for all of them here, as
    on an H200 where the wgmma kernel runs), a block's norms, silu_mul (llama) and attention write it so and the
    layers take it: the logits equal the plain run's bit for bit (dim 256, heads of 128, intermediate 256: whole
    128-column tiles). Llama: all four layers of a block take it; OPT (pre-LN): qkv, out_proj and fc1 (fc2's x
    comes from a torch relu), the others are not asked."""
    base = dict(NAMED_CONFIGS["tiny-opt"]) if arch == "opt" else dict(arch="llama", n_kv_heads=1)
    config = ModelConfig(**dict(base, vocab_size=VOCAB, dim=256, n_layers=2, n_heads=2, intermediate_size=256,
                                max_position_embeddings=64))
    model = build_random(config, "e3m2", "cpu", seed=seed_of(gen), progress=False)
    tokens = torch.randint(0, VOCAB, (2, 5), generator=gen)
    plain = run(model, tokens)
    asked, ordered = [], []
    forward = FPxLinear.forward
    monkeypatch.setattr(FPxLinear, "takes_ordered_x", lambda self, x: asked.append(self) or True)
    monkeypatch.setattr(FPxLinear, "forward", lambda self, x, x_ordered=False: ordered.append(x_ordered)
                        or forward(self, x, x_ordered))
    assert torch.equal(run(model, tokens), plain)
    took = 4 if arch == "llama" else 3
    assert len(asked) == took * config.n_layers and ordered.count(True) == took * config.n_layers
    assert ordered.count(False) == (4 - took) * config.n_layers
