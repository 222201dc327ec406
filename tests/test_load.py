"""``fp6llm.load`` and its checks (engine/load.py): a random model, a Hugging Face directory against transformers'
generation, a packed checkpoint, the weight and KV-cache estimates, DoesNotFit, and ModelSource's errors.
"""

import json
import subprocess
import sys

import pytest
import torch

import fp6llm
from fp6llm.engine import ByteTokenizer, Engine
from fp6llm.engine.load import DoesNotFit, ModelSource, kv_cache_bytes, require_memory, weight_bytes
from fp6llm.evals.throughput import model_bytes, streamed_weight_bytes
from fp6llm.models import ModelConfig, build_random
from fp6llm.models.checkpoint import quantize_checkpoint, save_packed
from helpers import TINY_VOCAB as VOCAB


def test_load_random_generates_and_import_stays_light():
    engine = fp6llm.load("random:tiny-llama", device="cpu", max_batch_size=2, max_seq_len=64, progress=False)
    assert len(engine.generate(["a", "bc", "def"], max_new_tokens=5)) == 3
    code = "import sys, fp6llm; print(any(m.startswith(('transformers', 'fp6llm.engine')) for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


@pytest.fixture(scope="module")
def hf_llama_dir(tmp_path_factory):
    """A tiny random Hugging Face Llama checkpoint with a byte-level BPE tokenizer trained on the spot."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = tmp_path_factory.mktemp("hf-llama")
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(["It was the best of times, it was the worst of times"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng():  # transformers initializes from the global generator: seeded here only
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return path, model


def test_load_hf_directory_generates_what_transformers_generates(hf_llama_dir, tmp_path):
    path, hf_model = hf_llama_dir
    engine = fp6llm.load(path, fmt="fp32", device="cpu", max_batch_size=2, max_seq_len=64, progress=False)
    assert engine.stop_ids == {2}
    prompts = ["It was the best", "worst of"]
    texts = engine.generate(prompts, max_new_tokens=10)
    for prompt, text in zip(prompts, texts):
        ids = torch.tensor([engine.tokenizer.encode(prompt)])
        expected = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                     pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert text == engine.tokenizer.decode(expected)
    e3m2 = fp6llm.load(path, device="cpu", max_seq_len=64, progress=False).generate(prompts, max_new_tokens=10)
    packed = tmp_path / "packed"
    quantize_checkpoint(path, packed, "e3m2", progress=False)
    assert fp6llm.load(packed, device="cpu", max_seq_len=64, progress=False).generate(prompts, 10) == e3m2
    with pytest.raises(ValueError, match="packed as e3m2, not the requested e2m2"):
        fp6llm.load(packed, "e2m2")


def test_a_tokenizer_already_loaded_is_not_read_again(hf_llama_dir, monkeypatch, capsys):
    """load(tokenizer=...) takes the caller's; `fp6llm generate`, which reads it to check the prompts before the
    model loads, hands it over: the checkpoint's tokenizer is read once."""
    import importlib

    from fp6llm.cli import main

    engine_load = importlib.import_module("fp6llm.engine.load")  # the module, not fp6llm.engine's load()
    path, _ = hf_llama_dir
    reads, read = [], engine_load.load_tokenizer

    def counted(*args, **kwargs):
        reads.append(args)
        return read(*args, **kwargs)

    monkeypatch.setattr(engine_load, "load_tokenizer", counted)
    given = ModelSource.parse(path).tokenizer(ModelSource.parse(path).config())
    engine = fp6llm.load(path, fmt="fp32", device="cpu", max_seq_len=64, progress=False, tokenizer=given)
    assert engine.tokenizer is given and len(reads) == 1  # the read that made ``given``
    assert main(["generate", "--model", str(path), "--format", "fp32", "--prompt", "It was", "--max-new-tokens",
                 "2", "--batch-size", "1"]) == 0
    assert capsys.readouterr().out.startswith("It was") and len(reads) == 2


def test_packed_random_model_loads_with_the_byte_tokenizer(tiny_models, tmp_path):
    save_packed(tiny_models["tiny-llama", "e3m2"], tmp_path)
    engine = fp6llm.load(tmp_path, device="cpu", max_seq_len=64, progress=False)
    expected = Engine(tiny_models["tiny-llama", "e3m2"], ByteTokenizer(VOCAB), max_seq_len=64).generate("abc", 8)
    assert isinstance(engine.tokenizer, ByteTokenizer) and engine.generate("abc", 8) == expected


@torch.no_grad()
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt", "tiny-gemma3"])  # lm_head untied, tied, tied
def test_lm_head_in_a_format_of_its_own(name, tmp_path):
    """"e3m2+head=e2m5": lm_head becomes an FPxLinear of e2m5 (per-channel) and nothing else changes: a tied
    embedding keeps its float table (a decode step reads fewer bytes; a tied model holds more), and the logits are
    those of the float-head model with lm_head's weight set to the de-quantized e2m5 one (to float32 rounding:
    1e-5 of the largest logit). A packed checkpoint of a float head takes the head format at load; one saved with
    its head keeps it."""
    from fp6llm.models import load_hf
    from fp6llm.nn import FPxLinear
    plain = build_random(name, "e3m2", "cpu", progress=False)
    headed = build_random(name, "e3m2+head=e2m5", "cpu", progress=False)
    assert isinstance(headed.lm_head, FPxLinear) and headed.lm_head.fmt.name == "e2m5"
    assert headed.lm_head.group_size is None and type(plain.lm_head) is torch.nn.Linear
    assert torch.equal(headed.embed_tokens.weight, plain.embed_tokens.weight)
    # a decode step reads less (the float lm_head's bytes replaced by e2m5's); a tied one holds more (its planes)
    assert streamed_weight_bytes(headed) < streamed_weight_bytes(plain)
    assert (model_bytes(headed) > model_bytes(plain)) == plain.config.tie_word_embeddings
    expected = headed.lm_head.weight.dequantize(torch.float32)
    plain.lm_head = torch.nn.Linear(expected.shape[1], expected.shape[0], bias=False)
    plain.lm_head.weight.copy_(expected)
    tokens = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))
    positions = torch.arange(7).expand(2, 7)
    logits = []
    for model in (plain, headed):
        model.setup_caches(2, 16)
        logits.append(model(tokens, positions))
    assert (logits[0] - logits[1]).abs().max() <= 1e-5 * logits[0].abs().max()
    # a packed checkpoint of a float head takes the head format at load
    save_packed(build_random(name, "e3m2", "cpu", progress=False), tmp_path / "packed")
    loaded = load_hf(tmp_path / "packed", "e3m2+head=e2m5", device="cpu", progress=False)
    assert isinstance(loaded.lm_head, FPxLinear) and torch.equal(loaded.lm_head.plane0, headed.lm_head.plane0)
    with pytest.raises(ValueError, match="packed as e3m2, not the requested e2m3"):
        load_hf(tmp_path / "packed", "e2m3+head=e2m5", device="cpu", progress=False)
    # ... and one saved with its quantized head keeps it (fp6llm.json "head"; a tied one: planes of its own), the
    # same bits back, the same logits
    for head in ("e2m5", "e3m2"):  # another format than the body's, and the body's
        model = build_random(name, f"e3m2+head={head}", "cpu", progress=False)
        save_packed(model, tmp_path / head)
        assert json.loads((tmp_path / head / "fp6llm.json").read_text())["head"] == head
        back = load_hf(tmp_path / head, device="cpu", progress=False)
        assert isinstance(back.lm_head, FPxLinear) and back.lm_head.fmt.name == head
        assert all(torch.equal(a, b) for a, b in zip(back.lm_head.state_dict().values(),
                                                     model.lm_head.state_dict().values()))
        assert torch.equal(back.embed_tokens.weight, model.embed_tokens.weight)
        for m in (model, back):
            m.setup_caches(2, 16)
        assert torch.equal(model(tokens, positions), back(tokens, positions))
    with pytest.raises(ValueError, match="packed with lm_head in e2m5, not the requested e2m4"):
        load_hf(tmp_path / "e2m5", "e3m2+head=e2m4", device="cpu", progress=False)
    # bench / eval derive other formats from a packed checkpoint's weights: the body only, the head as asked
    from fp6llm.engine.load import ModelSource
    from fp6llm.evals.throughput import load_as
    derived, note = load_as(ModelSource.parse(tmp_path / "e2m5"), "e2m3", device="cpu", progress=False)
    assert note == "from e3m2" and derived.lm_head.fmt.name == "e2m5"
    assert {m.fmt.name for n, m in derived.named_modules() if isinstance(m, FPxLinear) and n != "lm_head"} == {"e2m3"}
    derived, _ = load_as(ModelSource.parse(tmp_path / "e2m5"), "e2m3+head=e2m4", device="cpu", progress=False)
    assert derived.lm_head.fmt.name == "e2m4"
    with pytest.raises(ValueError, match="of fp32 weights keeps lm_head float, not e2m5"):
        save_packed(build_random(name, "fp32+head=e2m5", "cpu", progress=False), tmp_path / "float")


@pytest.mark.parametrize("fmt, group_size", [("e3m2", None), ("e2m1", 32), ("fp32", None), ("e3m2+head=e2m5", None)])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_weight_estimate_matches_the_built_model(name, fmt, group_size):
    built = model_bytes(build_random(name, fmt, "cpu", group_size=group_size, progress=False))
    estimate = weight_bytes(ModelConfig.from_name(name), fmt, None, group_size)
    assert built <= estimate <= built * 1.05  # group scales are counted as float32, built as float16


def test_does_not_fit_names_both_numbers(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * 10**9, 80 * 10**9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    config = ModelConfig.from_name("llama-2-7b")
    cache = kv_cache_bytes(config, 8, 1024, torch.float16)
    assert cache == 2 * 32 * 8 * 32 * 1024 * 128 * 2
    with pytest.raises(DoesNotFit, match=r"needs about 4\.3 GB \(4\.3 GB KV cache\) but Fake GPU has 2\.0 GB free "
                                         r"of 80\.0 GB"):
        require_memory("cuda", {"KV cache": cache}, "batch 8")
    require_memory("cpu", {"KV cache": cache}, "batch 8")  # no check off CUDA


def test_model_source_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown random model 'nope'; valid names: llama-2-7b"):
        ModelSource.parse("random:nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ModelSource.parse(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelSource.parse(tmp_path).config()
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        ModelSource.parse(tmp_path).tokenizer(None)
