"""Packed checkpoints (save_packed, quantize_checkpoint, fp6llm quantize) and every loader error, once each."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")

from fp6llm import LAYOUT_VERSION, __version__  # noqa: E402
from fp6llm.cli import main  # noqa: E402
from fp6llm.models import build_random, load_hf, load_packed, quantize_checkpoint, save_packed  # noqa: E402
from fp6llm.nn import FPxLinear  # noqa: E402
from test_models import VOCAB, positions, save_hf_model  # noqa: E402

TOKENIZER = {"tokenizer.json": "{}", "tokenizer_config.json": "{}", "special_tokens_map.json": "{}"}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Llama-3 checkpoint (transformers' save_pretrained) with tokenizer files beside it."""
    path = tmp_path_factory.mktemp("hf")
    save_hf_model("llama3", path)
    for name, text in TOKENIZER.items():
        (path / name).write_text(text)
    return path


@torch.no_grad()
def logits(model, tokens):
    model.setup_caches(tokens.shape[0], 32)
    return model(tokens, positions(*tokens.shape))


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("fmt, group_size", [("e3m2", None), ("e2m1", 32)])
def test_save_load_is_bit_identical(hf_dir, tmp_path, fmt, group_size, gen):
    model = load_hf(hf_dir, fmt=fmt, group_size=group_size, device="cpu", progress=False)
    summary = save_packed(model, tmp_path, source=hf_dir, max_shard_bytes=20_000)
    assert summary["shards"] > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    assert all((tmp_path / name).is_file() for name in TOKENIZER)
    loaded = load_packed(tmp_path, device="cpu", progress=False)
    assert isinstance(loaded.layers[1].self_attn.qkv_proj, FPxLinear)
    assert_same_model(model, loaded)
    tokens = torch.randint(0, VOCAB, (2, 10), generator=gen)
    assert torch.equal(logits(model, tokens), logits(loaded, tokens))


def test_the_recorded_version_is_the_installed_packages_or_null_from_a_source_tree(monkeypatch, tmp_path):
    from importlib import metadata

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    model = build_random("tiny-llama", "e3m2", "cpu", progress=False)
    save_packed(model, tmp_path / "installed")
    installed = metadata.version("fp6llm")
    assert json.loads((tmp_path / "installed" / "fp6llm.json").read_text())["fp6llm_version"] == installed
    monkeypatch.setattr(metadata, "version", not_installed)
    save_packed(model, tmp_path / "source-tree")
    assert json.loads((tmp_path / "source-tree" / "fp6llm.json").read_text())["fp6llm_version"] is None
    assert load_packed(tmp_path / "source-tree", device="cpu", progress=False) is not None  # null is readable


def test_the_package_version_is_pyprojects_through_the_installed_metadata(monkeypatch):
    """fp6llm.__version__ is the installed package's (pyproject.toml's, not a second copy); a source tree that was
    never installed says it does not know."""
    import importlib
    from importlib import metadata

    import fp6llm
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert fp6llm.__version__ == metadata.version("fp6llm") == pyproject["project"]["version"]

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    try:
        assert importlib.reload(fp6llm).__version__ == "0+unknown"
    finally:
        monkeypatch.undo()
        importlib.reload(fp6llm)
    assert fp6llm.__version__ == pyproject["project"]["version"]


def test_quantize_checkpoint_streams_the_same_weights(hf_dir, tmp_path):
    summary = quantize_checkpoint(hf_dir, tmp_path, "e3m2", device="cpu", progress=False, dtype=torch.float32)
    assert summary["bytes_out"] < summary["bytes_in"]
    meta = json.loads((tmp_path / "fp6llm.json").read_text())
    assert meta["format"] == "e3m2" and meta["group_size"] is None and meta["layout_version"] == LAYOUT_VERSION
    assert meta["fp6llm_version"] == __version__ and meta["source"] == str(hf_dir.resolve())
    assert all((tmp_path / name).is_file() for name in [*TOKENIZER, "config.json", "generation_config.json"])
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert summary["tensors"] == len(keys) and summary["shards"] == 1
    assert {"layers.0.self_attn.qkv_proj.plane0", "layers.0.self_attn.qkv_proj.plane1",
            "layers.0.self_attn.qkv_proj.scales", "lm_head.weight", "norm.weight"} <= keys
    # what is not quantized is stored as asked (float32 here; the default, float16, is tested in test_cli.py)
    assert load_file(tmp_path / "model.safetensors")["norm.weight"].dtype == torch.float32
    direct = load_hf(hf_dir, fmt="e3m2", device="cpu", progress=False)
    packed = load_hf(tmp_path, device="cpu", progress=False)  # detects fp6llm.json
    assert_same_model(direct, packed)


@pytest.mark.parametrize("case", ["llama3", "llama-bias-tied"])  # lm_head untied, tied to the embedding
def test_quantize_checkpoint_stores_an_lm_head_format(case, tmp_path, gen):
    """--format e3m2+head=e2m5: lm_head's planes and scales stored (a tied one's quantized from the embedding,
    which stays float), fp6llm.json says head e2m5 and format e3m2; it loads back as the same bits as quantizing at
    load gives (both from float16), and its fp6llm.json is checked like the rest: a bad head, a head in the format
    field, lm_head planes of another width are each refused, naming what is wrong."""
    save_hf_model(case, tmp_path / "hf", seed=int(torch.randint(0, 2**31, (1,), generator=gen)))
    summary = quantize_checkpoint(tmp_path / "hf", tmp_path / "out", "e3m2+head=e2m5", progress=False)
    assert summary["format"] == "e3m2+head=e2m5"
    meta = json.loads((tmp_path / "out" / "fp6llm.json").read_text())
    assert (meta["format"], meta["head"]) == ("e3m2", "e2m5")
    keys = set(load_file(tmp_path / "out" / "model.safetensors").keys())
    assert {"lm_head.plane0", "lm_head.scales", "embed_tokens.weight"} <= keys  # 8 bits: one plane
    assert "lm_head.weight" not in keys and "lm_head.plane1" not in keys
    packed = load_hf(tmp_path / "out", device="cpu", progress=False)
    direct = load_hf(tmp_path / "hf", "e3m2+head=e2m5", device="cpu", dtype=torch.float16, progress=False)
    assert isinstance(packed.lm_head, FPxLinear) and packed.lm_head.fmt.name == "e2m5"
    assert all(torch.equal(a, b) for a, b in zip(packed.lm_head.state_dict().values(),
                                                 direct.lm_head.state_dict().values()))
    with pytest.raises(ValueError, match="of fp16 weights keeps lm_head float"):
        quantize_checkpoint(tmp_path / "hf", tmp_path / "float", "fp16+head=e2m5", progress=False)
    for change, message in (({"head": 5}, "head=5 is not null or a format name"),
                            ({"head": "e9m9"}, "unsupported format e9m9"),
                            ({"format": "e3m2+head=e2m5"}, "names an lm_head format: that is the head field's"),
                            ({"head": "e2m4"}, r"declares e2m4 \(planes of widths \(4, 2, 1\)\), but lm_head has "
                                               r"planes 0")):
        (tmp_path / "out" / "fp6llm.json").write_text(json.dumps({**meta, **change}))
        with pytest.raises(ValueError, match=message):
            load_hf(tmp_path / "out", device="cpu", progress=False)


def test_packed_random_model_round_trips(tmp_path):
    model = build_random("tiny-opt", fmt="e2m3", device="cpu", seed=5, progress=False)
    save_packed(model, tmp_path)
    loaded = load_hf(tmp_path, fmt="e2m3", device="cpu", progress=False)
    assert_same_model(model, loaded)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_cli_quantize(hf_dir, tmp_path, capsys):
    assert main(["quantize", str(hf_dir), str(tmp_path / "out"), "--format", "fp6", "--group-size", "32",
                 "--quiet"]) == 0
    assert "e3m2 group_size=32" in capsys.readouterr().out
    assert main(["quantize", str(tmp_path / "missing"), str(tmp_path / "out2")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_packed_mismatches_are_errors(hf_dir, tmp_path):
    quantize_checkpoint(hf_dir, tmp_path, "e3m2", progress=False)
    with pytest.raises(ValueError, match="packed as e3m2, not the requested e2m1"):
        load_hf(tmp_path, fmt="e2m1", progress=False)
    with pytest.raises(ValueError, match="group_size=None, not 64"):
        load_hf(tmp_path, group_size=64, progress=False)
    with pytest.raises(ValueError, match="already an fp6llm packed checkpoint"):
        quantize_checkpoint(tmp_path, tmp_path / "again", progress=False)
    meta = json.loads((tmp_path / "fp6llm.json").read_text())
    (tmp_path / "fp6llm.json").write_text(json.dumps({**meta, "layout_version": LAYOUT_VERSION + 1}))
    with pytest.raises(ValueError, match="layout version"):
        load_hf(tmp_path, progress=False)


@pytest.fixture
def broken(hf_dir, tmp_path):
    """A copy of hf_dir's config and weights whose tensors a test may change: call it with the new tensors."""
    tensors = load_file(hf_dir / "model.safetensors")
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())

    def write(change):
        save_file(change(dict(tensors)), tmp_path / "model.safetensors", metadata={"format": "pt"})
        return tmp_path
    return write


def test_missing_tensor(broken):
    path = broken(lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight' is missing"):
        load_hf(path, progress=False)


def test_wrong_shape(broken):
    path = broken(lambda t: {**t, "model.norm.weight": torch.ones(63)})
    with pytest.raises(ValueError, match=r"'model.norm.weight'.*shape \(63,\), expected \(64,\)"):
        load_hf(path, progress=False)


def test_wrong_dtype(broken):
    path = broken(lambda t: {**t, "model.layers.0.self_attn.k_proj.weight": torch.ones(32, 64, dtype=torch.int32)})
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.k_proj.weight'.*torch.int32, expected"):
        load_hf(path, progress=False)


def test_truncated_shard(broken):
    path = broken(lambda t: t)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read .*model.safetensors \(truncated"):
        load_hf(path, progress=False)


def test_missing_shard(tmp_path):
    save_hf_model("qwen2", tmp_path, max_shard_size="100KB")
    next(tmp_path.glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match=r"shard .*model-00002-of-\d+.safetensors listed in"):
        load_hf(tmp_path, progress=False)


def test_missing_config_unknown_model_and_pickles(broken, tmp_path):
    path = broken(lambda t: t)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt_neox'.*llama, mistral, qwen2, opt"):
        load_hf(path, progress=False)
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf(path, progress=False)
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf(path, progress=False)
    (path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="safetensors only"):
        load_hf(path, progress=False)
