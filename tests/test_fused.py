"""Fused projections (fp6llm.fused): stacking quantized rows is quantizing the stack, and a packed checkpoint of the
old unfused layout (q_proj, k_proj, v_proj, gate_proj, up_proj) loads into the fused model, whole or per rank, bit
for bit as the fused layout does. Logits against transformers: tests/test_models.py; per-rank loading from Hugging
Face checkpoints: tests/test_tp.py.
"""

import json

import pytest
import torch

from fp6llm.formats import FPFormat
from fp6llm.packing import pack, plane_widths, unpack
from safetensors.torch import load_file, save_file

from fp6llm import fused
from fp6llm.models import ModelConfig, build_model, build_random, load_packed, save_packed
from fp6llm.nn import FPxLinear
from fp6llm.quantize import quantize_weight
from fp6llm.models.parallel import TensorParallel, apply_tensor_parallel

CONFIG = ModelConfig(arch="llama", vocab_size=128, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, qkv_bias=True,
                     intermediate_size=256, max_position_embeddings=64)  # K slices of 128 columns at TP 2


def assert_same_weights(model, expected) -> None:
    ours, theirs = model.state_dict(), expected.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert tensor.dtype == theirs[name].dtype and torch.equal(tensor, theirs[name]), name


@pytest.mark.parametrize("fmt, group_size", [("e3m2", None), ("e2m1", 32), ("e3m2", 64)])
def test_stacked_quantized_rows_are_the_quantized_stack(fmt, group_size, gen):
    rows = (48, 16, 16)
    parts = [torch.randn(n, 192, generator=gen) * (i + 1) for i, n in enumerate(rows)]
    stacked = fused.concat_quantized([quantize_weight(w, fmt, group_size) for w in parts])
    whole = quantize_weight(torch.cat(parts), fmt, group_size)
    assert stacked.shape == whole.shape == (80, 192)
    assert all(torch.equal(a, b) for a, b in zip(stacked.planes, whole.planes))
    assert stacked.scales.dtype == whole.scales.dtype and torch.equal(stacked.scales, whole.scales)


def test_stacking_scales_of_two_dtypes_widens_them_exactly(gen):
    a, b = (quantize_weight(torch.randn(8, 64, generator=gen), "e3m2", 32) for _ in range(2))
    a.scales = a.scales.float()
    b.scales = b.scales.half()
    stacked = fused.concat_quantized([a, b])
    assert stacked.scales.dtype == torch.float32
    assert torch.equal(stacked.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))


def test_stacking_refuses_mixed_formats(gen):
    w = torch.randn(8, 64, generator=gen)
    with pytest.raises(ValueError, match="one format"):
        fused.concat_quantized([quantize_weight(w, "e3m2"), quantize_weight(w, "e2m1")])
    with pytest.raises(TypeError, match="not mixed"):
        fused.concat_linears([FPxLinear.from_linear(torch.nn.Linear(64, 8)), torch.nn.Linear(64, 8)])


def unfuse_checkpoint(src, dst, config: ModelConfig) -> None:
    """Rewrite the fused packed checkpoint ``src`` in the layout of fp6llm before fused projections: every
    qkv_proj / gate_up_proj tensor split by rows into its parts' tensors, under the parts' names."""
    model = build_model(config, "meta")
    layouts = fused.layout(model)
    meta = json.loads((src / "fp6llm.json").read_text())
    tensors = load_file(src / "model.safetensors")
    out = {}
    for key, tensor in tensors.items():
        module, _, suffix = key.rpartition(".")
        if module not in layouts:
            out[key] = tensor
            continue
        if suffix.startswith("plane"):  # layout 2 packs 16-row tiles: split the codes, pack each part
            if suffix != "plane0":
                continue
            fmt = FPFormat.parse(meta["format"])
            planes = [tensors[f"{module}.plane{i}"] for i in range(len(plane_widths(fmt.bits)))]
            total = sum(rows for _, _, rows in layouts[module])
            in_features = config.dim if "qkv" in module or "gate_up" in module else None
            codes = unpack(planes, fmt, in_features, total)
            for part, offset, rows in layouts[module]:
                for i, plane in enumerate(pack(codes[offset:offset + rows], fmt)):
                    out[f"{part}.plane{i}"] = plane
            continue
        for part, offset, rows in layouts[module]:
            out[f"{part}.{suffix}"] = tensor[offset:offset + rows].clone()
    tensors = out
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "fp6llm.json").write_text((src / "fp6llm.json").read_text())


@pytest.mark.parametrize("fmt, group_size", [("e3m2", None), ("e2m1", 32), ("fp32", None)])
def test_a_packed_checkpoint_of_the_unfused_layout_loads(fmt, group_size, tmp_path):
    model = build_random(CONFIG, fmt, "cpu", seed=3, group_size=group_size, progress=False)
    save_packed(model, tmp_path / "fused")
    assert "layers.0.self_attn.qkv_proj.bias" in load_file(tmp_path / "fused" / "model.safetensors")
    unfuse_checkpoint(tmp_path / "fused", tmp_path / "unfused", CONFIG)
    old_keys = load_file(tmp_path / "unfused" / "model.safetensors").keys()
    assert "layers.1.mlp.up_proj.bias" not in old_keys and not any("qkv_proj" in k for k in old_keys)
    assert {"layers.1.self_attn.k_proj.bias", "layers.1.mlp.up_proj." + ("weight" if fmt == "fp32" else "plane0")
            } <= old_keys
    old = load_packed(tmp_path / "unfused", device="cpu", progress=False)
    assert_same_weights(old, model)
    for rank in range(2):
        tp = TensorParallel(rank, 2)
        expected = apply_tensor_parallel(build_random(CONFIG, fmt, "cpu", seed=3, group_size=group_size,
                                                      progress=False), rank, 2)
        for path in ("fused", "unfused"):
            assert_same_weights(load_packed(tmp_path / path, device="cpu", progress=False, tp=tp), expected)


def test_fused_rows_are_the_parts_rows_in_order():
    model = build_model(CONFIG, "meta")
    head = CONFIG.head_dim
    layout = fused.layout(model)
    assert layout["layers.0.self_attn.qkv_proj"] == (("layers.0.self_attn.q_proj", 0, 4 * head),
                                                     ("layers.0.self_attn.k_proj", 4 * head, 2 * head),
                                                     ("layers.0.self_attn.v_proj", 6 * head, 2 * head))
    assert layout["layers.1.mlp.gate_up_proj"] == (("layers.1.mlp.gate_proj", 0, 256),
                                                   ("layers.1.mlp.up_proj", 256, 256))


def test_the_layout_is_what_the_model_class_declares():
    """fused.layout reads the class's FUSED (a model without it has no fused projections) and sizes each part by its
    TENSOR_PARALLEL features; a part that TENSOR_PARALLEL does not name, or a size off the config, is refused."""
    assert fused.layout(torch.nn.Sequential(torch.nn.Linear(4, 4))) == {}
    model = build_model(CONFIG, "meta")

    class Undeclared(type(model)):
        FUSED = {"mlp.gate_up_proj": ("mlp.gate_proj", "mlp.side_proj")}

    model.__class__ = Undeclared
    with pytest.raises(ValueError, match="Undeclared.FUSED names mlp.side_proj, which its TENSOR_PARALLEL does not"):
        fused.layout(model)
    model.__class__ = Undeclared.__mro__[1]
    model.layers[1].mlp.gate_up_proj = torch.nn.Linear(CONFIG.dim, 3 * CONFIG.intermediate_size, device="meta")
    with pytest.raises(ValueError, match=r"layers.1.mlp.gate_up_proj has 768 output features, its parts .* 512 by"):
        fused.layout(model)
