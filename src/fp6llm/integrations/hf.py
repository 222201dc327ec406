"""FP6 (FPx) in Hugging Face transformers: ``quant_method: "fp6llm"``, registered out of tree.

    import fp6llm.integrations.hf  # registers FPxConfig and FPxHfQuantizer with transformers
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=FPxConfig("e3m2"))

Quantizing while loading: transformers reads one checkpoint tensor at a time (sequentially when a quantizer
quantizes on the fly); each nn.Linear weight is handed to ``FPxQuantize``, which quantizes it with
fp6llm.quantize_weight and swaps the Linear for an fp6llm.nn.FPxLinear, so the float weight is dropped at once:
memory holds the quantized layers plus the one weight being read. ``save_pretrained`` writes the FPxLinear buffers
(``<module>.plane0``, ``.plane1``, ``.scales``, ``.bias``: the packed layout of docs/layout.md) as safetensors and
``quantization_config`` into config.json; ``from_pretrained`` of that directory builds FPxLinear placeholders on
the meta device and loads the packed buffers into them with no re-quantization. Forward passes run
fp6llm.ops.fpx_linear: the Triton kernel on CUDA, the PyTorch reference elsewhere. Needs transformers 5 (its
conversion ops, transformers.core_model_loading).

One directory for both: not yet. fp6llm's packed checkpoints (``fp6llm quantize``) name tensors by fp6llm's
modules, without transformers' ``model.`` / ``model.decoder.`` prefixes, with fused qkv_proj / gate_up_proj rows,
and their config.json carries no ``quantization_config``: loading one here needs that key, a renaming and a
row-splitting conversion in this quantizer. The other way, fp6llm.load needs its loader to read config.json's
``quantization_config`` as packed metadata and the tensors under transformers' (unfused) names.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import transformers
from torch import nn

try:  # transformers 5's
    from transformers.core_model_loading import ConversionOps
except ImportError as error:
    raise ImportError(f"fp6llm.integrations.hf needs transformers 5 or newer (its conversion ops); this is "
                      f"transformers {transformers.__version__}: pip install 'transformers>=5'") from error
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..formats import FPFormat
from ..nn import FPxLinear, _skipped
from ..packing import LAYOUT_VERSION, plane_shape, plane_widths
from ..quantize import QuantizedWeight, quantize_weight

QUANT_METHOD = "fp6llm"
DEFAULT_SKIP = ("lm_head",)  # as fp6llm's own loader: the output projection stays unquantized


class FPxConfig(QuantizationConfigMixin):
    """What config.json's ``quantization_config`` says about an fp6llm model.

    format: an FPx format name ("e3m2" = FP6, "e2m2", "e2m1", any eXmY, or "fp6" / "fp5" / "fp4").
    group_size: None for one scale per output channel, else one scale per group of that many input columns (it
    must divide every quantized layer's in_features). modules_to_not_convert: fnmatch patterns matched against a
    Linear's full dotted name or its last part (default: lm_head). layout_version: the packed layout
    (fp6llm.packing.LAYOUT_VERSION); a checkpoint of another version is refused. Raises ValueError for an unknown
    format, a non-positive group size or another layout version.
    """

    def __init__(self, format: str = "e3m2", group_size: Optional[int] = None,
                 modules_to_not_convert: Optional[Sequence[str]] = None, layout_version: int = LAYOUT_VERSION,
                 **kwargs):
        # config.json's own key comes back through from_dict; anything else is a misspelt argument, refused rather
        # than ignored (FPxConfig("e3m2", groupsize=64) must not quantize per channel in silence)
        unknown = sorted(set(kwargs) - {"quant_method"})
        if unknown:
            raise TypeError(f"FPxConfig got unknown arguments {unknown}; it takes format, group_size, "
                            f"modules_to_not_convert and layout_version")
        if kwargs.get("quant_method", QUANT_METHOD) != QUANT_METHOD:
            raise ValueError(f"FPxConfig is quant_method {QUANT_METHOD!r}, got {kwargs['quant_method']!r}")
        self.quant_method = QUANT_METHOD
        self.format = FPFormat.parse(format).name
        if group_size is not None and (not isinstance(group_size, int) or group_size <= 0):
            raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
        self.group_size = group_size
        self.modules_to_not_convert = list(DEFAULT_SKIP if modules_to_not_convert is None else modules_to_not_convert)
        if layout_version != LAYOUT_VERSION:
            raise ValueError(f"quantization_config has packed layout version {layout_version}; this fp6llm reads "
                             f"layout version {LAYOUT_VERSION}")
        self.layout_version = layout_version

    @property
    def fmt(self) -> FPFormat:
        return FPFormat.parse(self.format)

    def skips(self, name: str) -> bool:
        """Whether the Linear ``name`` stays float: the rule of quantize_model's ``skip``."""
        return _skipped(name, self.modules_to_not_convert)


def quantized_linears(model: nn.Module, config: FPxConfig) -> list[str]:
    """Names of the nn.Linear modules of ``model`` that ``config`` quantizes."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and not config.skips(name)]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


_SAFETENSORS_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def _stored_dtypes(checkpoint_files, suffix: str) -> dict:
    """{tensor name: torch dtype} of the float tensors whose names end in ``suffix`` in the safetensors files among
    ``checkpoint_files``, read from their headers (no tensor is read)."""
    from safetensors import safe_open
    dtypes = {}
    for path in checkpoint_files or ():
        if str(path).endswith(".safetensors"):
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if key.endswith(suffix):
                        stored = _SAFETENSORS_FLOATS.get(f.get_slice(key).get_dtype())
                        if stored is not None:
                            dtypes[key] = stored
    return dtypes


def _meta_fpx_linear(linear: nn.Linear, config: FPxConfig, scales_dtype: torch.dtype = torch.float32) -> FPxLinear:
    """An FPxLinear of ``linear``'s shape on the meta device: the placeholders that a packed checkpoint fills.
    ``scales_dtype``: the checkpoint's (float16 group scales stay float16: transformers 5.17 casts a stored tensor
    to its placeholder's dtype; 5.25 keeps the stored one through get_new_dtype)."""
    n, k = linear.out_features, linear.in_features
    planes = tuple(torch.empty(plane_shape(n, k, width), dtype=torch.int32, device="meta")
                   for width in plane_widths(config.fmt.bits))
    scales = torch.empty((n,) if config.group_size is None else (n, k // config.group_size), dtype=scales_dtype,
                         device="meta")
    bias = None if linear.bias is None else torch.empty(n, dtype=linear.bias.dtype, device="meta")
    return FPxLinear(QuantizedWeight(planes, scales, config.fmt, (n, k), config.group_size), bias)


class FPxQuantize(ConversionOps):
    """transformers' on-load conversion of one Linear weight: quantize it and swap the Linear for an FPxLinear.

    Returns no tensors (the new module holds them). The Linear's bias, if already loaded, moves into the FPxLinear;
    if it comes later, transformers sets it on the FPxLinear's ``bias`` buffer by the same name.
    """

    def __init__(self, quantizer: "FPxHfQuantizer"):
        self.quantizer = quantizer

    def convert(self, input_dict: dict, model: Optional[nn.Module] = None, full_layer_name: Optional[str] = None,
                missing_keys: Optional[set] = None, **kwargs) -> dict:
        config = self.quantizer.quantization_config
        for key, value in input_dict.items():
            weight = value[0] if isinstance(value, list) else value
            name = key.removesuffix(".weight")
            linear = model.get_submodule(name)
            bias = None if linear.bias is None else linear.bias.detach()
            layer = FPxLinear(quantize_weight(weight, config.fmt, config.group_size), bias)
            for tensor in layer.buffers():
                tensor._is_hf_initialized = True  # transformers must not re-initialize them
            layer._is_hf_initialized = True
            _replace(model, name, layer)
            if missing_keys is not None:
                missing_keys.discard(key)
        return {}


class FPxHfQuantizer(HfQuantizer):
    """Quantizes a model's nn.Linear layers to FPx while it loads, or loads fp6llm-packed FPxLinear buffers."""

    requires_calibration = False

    def __init__(self, quantization_config: FPxConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.targets: set = set()

    @property
    def quantized_element_size(self) -> float:
        return self.quantization_config.fmt.bits / 8

    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("fp6llm's FPxLinear layers cannot be offloaded to disk: map them to GPUs or the CPU")

    def param_element_size(self, model, param_name: str, param: torch.Tensor) -> float:
        """Bytes per element that a weight quantized on load ends up costing (its padded planes and
        scales), others' own. transformers sizes its allocator warm-up with this (one empty tensor of the
        model's bytes per GPU before loading). transformers 5.17 (the device's) counts a weight at its float16 size
        unless the quantizer says otherwise here (5.25 also reads quantized_element_size), so loading reserved, and
        peaked at, the whole float16 model's memory however small the quantized model."""
        if not self.param_needs_quantization(model, param_name):
            return param.element_size()
        config = self.quantization_config
        n, k = param.shape
        planes = sum(math.prod(plane_shape(n, k, width)) * 4 for width in plane_widths(config.fmt.bits))
        # float32 per row; per group float16 where every scale fits (nearly always), else float32
        scales = n * 4 if config.group_size is None else n * (k // config.group_size) * 2
        return (planes + scales) / (n * k)

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        name, _, tensor = param_name.rpartition(".")
        return not self.pre_quantized and tensor == "weight" and name in self.targets

    def get_quantize_ops(self) -> FPxQuantize:
        return FPxQuantize(self)

    def get_new_dtype(self, converter, param, dtype):
        """Packed planes and scales keep their stored dtype (float16 group scales stay float16); biases and the
        unquantized tensors get transformers' usual dtype."""
        module, _, tensor = (getattr(converter, "target_patterns", None) or [""])[0].rpartition(".")
        if self.pre_quantized and module in self.targets and tensor != "bias":
            return None
        return super().get_new_dtype(converter, param, dtype)

    def _process_model_before_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        self.targets = set(quantized_linears(model, config))
        for name in sorted(self.targets):  # before any weight is read, not as a conversion error after all of them
            k = model.get_submodule(name).in_features
            if config.group_size is not None and k % config.group_size:
                raise ValueError(f"group_size {config.group_size} does not divide in_features {k} of layer {name}")
        if self.pre_quantized:
            stored = _stored_dtypes(kwargs.get("checkpoint_files"), ".scales")
            for name in sorted(self.targets):
                _replace(model, name, _meta_fpx_linear(model.get_submodule(name), config,
                                                       stored.get(f"{name}.scales", torch.float32)))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for name in sorted(self.targets):
            module = model.get_submodule(name)
            if not isinstance(module, FPxLinear):
                raise ValueError(f"layer {name} was not quantized (its weight was missing from the checkpoint?)")
            module.weight  # noqa: B018 - builds its QuantizedWeight, which checks the loaded shapes and dtypes
        return model

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register FPxConfig and FPxHfQuantizer as quant_method "fp6llm" (once; importing this module does it)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(FPxConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(FPxHfQuantizer)


register()
