"""Checkpoints as untrusted input: nothing from one is executed or unpickled, garbage sizes and metadata fail in
one line naming the file and the field before anything is built, and bad scales are refused."""

import json
import pickle
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from fp6llm.cli import main  # noqa: E402
from fp6llm.engine.tokenizer import load_tokenizer  # noqa: E402
from fp6llm.models import build_random, load_hf, save_packed  # noqa: E402
from fp6llm.models.loader import read_hf_config  # noqa: E402
from helpers import seeded  # noqa: E402
from test_models import save_hf_model  # noqa: E402

WORDS = ["<unk>", "</s>", "hi", "there"]
# A module that, if ever imported, writes the marker file MARKER (an absolute path: transformers imports a copy from
# its modules cache): the "custom code" of a hostile checkpoint.
EVIL_CODE = """import pathlib
pathlib.Path(MARKER).write_text("custom code ran")
from transformers import PreTrainedTokenizerFast, PreTrainedModel
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
class EvilModel(PreTrainedModel):
    pass
"""


class WritesMarker:
    """Unpickling this writes a marker file (what a hostile pytorch_model.bin can do)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('unpickled')",))


def word_tokenizer_json(path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(path / "tokenizer.json"))


def tiny_bert(path, **config_fields) -> None:
    config = transformers.BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=16)
    (path / "config.json").write_text(json.dumps({**config.to_dict(), **config_fields}))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, module_gen):
    """Two checkpoints that try to run their own code through transformers' auto_map, and one whose only weights
    are a legitimate pickle (which must not be loaded either)."""
    tmp_path = tmp_path_factory.mktemp("hostile")
    tok = tmp_path / "tokenizer"
    tok.mkdir()
    (tok / "evil.py").write_text(f"MARKER = {str(tok / 'MARKER')!r}\n" + EVIL_CODE)
    word_tokenizer_json(tok)
    (tok / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}, "eos_token": "</s>"}))
    enc = tmp_path / "encoder"
    enc.mkdir()
    (enc / "evil.py").write_text(f"MARKER = {str(enc / 'MARKER')!r}\n" + EVIL_CODE)
    tiny_bert(enc, auto_map={"AutoModel": "evil.EvilModel"})
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    tiny_bert(pickled)
    bert = seeded(module_gen, lambda: transformers.BertModel(transformers.BertConfig.from_pretrained(pickled)))
    torch.save(bert.state_dict(), pickled / "pytorch_model.bin")
    return tok, enc, pickled


def test_no_checkpoint_code_runs_even_when_the_prompt_is_answered_yes(hostile):
    tok, enc, _ = hostile
    # "y" on stdin answers transformers' "run the custom code? [y/N]", which only a missing trust_remote_code=False
    # asks: the loaders must not ask.
    script = ("from fp6llm.engine.tokenizer import load_tokenizer; from fp6llm.evals.embeddings import load_encoder\n"
              f"t = load_tokenizer({str(tok)!r}); print('tokenizer', t.encode('hi there'), sorted(t.eos_token_ids))\n"
              f"try:\n    load_encoder({str(enc)!r})\nexcept (OSError, ValueError) as err:\n"
              "    print('encoder refused', type(err).__name__)\n")
    result = subprocess.run([sys.executable, "-c", script], input="y\ny\ny\n", capture_output=True, text=True,
                            timeout=120)
    assert not (tok / "MARKER").exists() and not (enc / "MARKER").exists(), result.stdout + result.stderr
    assert result.returncode == 0, result.stderr
    assert "tokenizer [2, 3] [1]" in result.stdout and "encoder refused" in result.stdout


def test_encoder_never_reads_a_pickle(hostile, tmp_path):
    from fp6llm.evals.embeddings import load_encoder
    _, _, pickled = hostile
    with pytest.raises((OSError, ValueError), match="safetensors"):
        load_encoder(pickled)  # a legitimate state dict, but a pickle all the same
    marker = tmp_path / "UNPICKLED"
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps(WritesMarker(marker)))
    with pytest.raises((OSError, ValueError)):
        load_encoder(pickled)
    assert not marker.exists()


def test_garbage_tokenizer_files_are_one_line_errors(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "nonsense"')
    with pytest.raises(ValueError, match=r"tokenizer\.json is not a tokenizer"):
        load_tokenizer(tmp_path)
    word_tokenizer_json(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json is not valid JSON"):
        load_tokenizer(tmp_path)


# ---- config sizes against the tensors present ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    save_hf_model("llama3", path)  # 2 layers, hidden 64, vocabulary 256
    return path


HF_CONFIG_CASES = {  # config.json change -> the error (a regex); every one must fail before any module is built
    "layers-10**6": ({"num_hidden_layers": 10**6}, r"num_hidden_layers=1000000 is not an integer in 1\.\.1024"),
    "layers-not-present": ({"num_hidden_layers": 3}, r"num_hidden_layers=3, but the checkpoint's tensors hold 2"),
    "hidden-10**9": ({"hidden_size": 10**9}, r"hidden_size=1000000000 is not an integer"),
    "vocab-negative": ({"vocab_size": -1}, r"vocab_size=-1 is not an integer"),
    "vocab-not-present": ({"vocab_size": 300}, r"vocab_size=300 and hidden_size=64 do not match the tensor "
                                               r"model\.embed_tokens\.weight of shape \(256, 64\)"),
    "vocab-missing": ({"vocab_size": None}, r"missing field\(s\) vocab_size"),
    "layers-string": ({"num_hidden_layers": "2"}, r"num_hidden_layers='2' is not an integer"),
    "heads-zero": ({"num_attention_heads": 0}, r"num_attention_heads=0 is not an integer"),
    "eps-nan": ({"rms_norm_eps": float("nan")}, r"is not valid JSON: NaN"),
}


@pytest.mark.parametrize("case", HF_CONFIG_CASES, ids=str)
def test_bad_hf_config_sizes_are_refused_at_once(hf_dir, tmp_path, case):
    change, error = HF_CONFIG_CASES[case]
    config = {**json.loads((hf_dir / "config.json").read_text()), **change}
    config = {k: v for k, v in config.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(hf_dir / "model.safetensors")
    start = time.perf_counter()
    with pytest.raises(ValueError, match=error) as err:
        load_hf(tmp_path, progress=False)
    assert time.perf_counter() - start < 5
    assert str(tmp_path / "config.json") in str(err.value) and "\n" not in str(err.value)


def test_cli_says_a_bad_config_in_one_line(hf_dir, tmp_path, capsys):
    config = {**json.loads((hf_dir / "config.json").read_text()), "num_hidden_layers": 10**6}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(hf_dir / "model.safetensors")
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "num_hidden_layers=1000000" in err


# ---- packed checkpoints: fp6llm.json and scales ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("packed")
    save_packed(build_random("tiny-llama", fmt="e3m2", device="cpu", progress=False), path)
    return path


@pytest.fixture
def packed_copy(packed_dir, tmp_path):
    """A copy of packed_dir whose fp6llm.json (meta -> meta) and tensors (dict -> dict) a test changes."""
    def copy(meta=lambda m: m, tensors=None):
        (tmp_path / "fp6llm.json").write_text(json.dumps(meta(json.loads((packed_dir / "fp6llm.json").read_text()))))
        weights = load_file(packed_dir / "model.safetensors")
        save_file(weights if tensors is None else tensors(weights), tmp_path / "model.safetensors")
        return tmp_path
    return copy


def with_config(meta, **fields):
    return {**meta, "config": {**meta["config"], **fields}}


PACKED_CASES = {  # fp6llm.json change -> error
    "layers-10**6": (lambda m: with_config(m, n_layers=10**6), r"config: n_layers=1000000 is not an integer"),
    "layers-not-present": (lambda m: with_config(m, n_layers=5), r"n_layers=5, but the checkpoint's tensors hold 2"),
    "dim-not-present": (lambda m: with_config(m, dim=128, word_embed_proj_dim=128),
                        r"vocab_size=512 and dim=128 do not match"),
    "missing-field": (lambda m: {**m, "config": {k: v for k, v in m["config"].items() if k != "vocab_size"}},
                      r"missing field\(s\) vocab_size"),
    "6-bit-planes-as-e2m1": (lambda m: {**m, "format": "e2m1"},
                             r"declares e2m1 \(planes of widths \(4,\)\), but layers\.0\.\S+ has planes 0, 1"),
    "6-bit-planes-as-fp16": (lambda m: {**m, "format": "fp16"}, r"declares unquantized weights"),
    "6-bit-planes-as-e3m4": (lambda m: {**m, "format": "e3m4"}, r"has planes 0, 1"),
    "unknown-format": (lambda m: {**m, "format": "e9m9x"}, r"fp6llm\.json: format:"),
    "group-size-string": (lambda m: {**m, "group_size": "64"}, r"group_size='64' is not null or an integer"),
}


@pytest.mark.parametrize("case", PACKED_CASES, ids=str)
def test_bad_packed_metadata_is_refused(packed_copy, case):
    change, error = PACKED_CASES[case]
    path = packed_copy(change)
    with pytest.raises(ValueError, match=error) as err:
        load_hf(path, progress=False)
    assert "fp6llm.json" in str(err.value)


def test_5_bit_planes_declared_as_6_bit_are_refused(packed_copy):
    def five_bit(tensors):  # plane1 of width 1 instead of 2: half the words a row
        return {k: v[..., : v.shape[-1] // 2].contiguous() if k.endswith(".plane1") else v for k, v in tensors.items()}
    with pytest.raises(ValueError, match=r"plane1 has \d+ words a row against plane0's"):
        load_hf(packed_copy(tensors=five_bit), progress=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0])
def test_scales_must_be_finite_and_positive(packed_copy, gen, bad):
    def spoil(tensors):
        names = sorted(k for k in tensors if k.endswith(".scales"))
        name = names[int(torch.randint(len(names), (), generator=gen))]
        scales = tensors[name].clone()
        scales.view(-1)[int(torch.randint(scales.numel(), (), generator=gen))] = bad
        spoil.name = name
        return {**tensors, name: scales}
    path = packed_copy(tensors=spoil)
    with pytest.raises(ValueError, match=rf"{spoil.name} holds the scale .*finite and > 0"):
        load_hf(path, progress=False)


def test_read_hf_config_checks_without_loading(hf_dir):
    assert read_hf_config(hf_dir).n_layers == 2  # the good checkpoint passes every check
