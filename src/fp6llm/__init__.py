"""fp6llm: serve LLMs with FP6 (and FPx) weights on NVIDIA GPUs. See README.md."""

from .formats import FPFormat, decode, encode
from .nn import FPxLinear, quantize_model
from .ops import fpx_linear
from .packing import LAYOUT_VERSION, pack, unpack
from .quantize import QuantizedWeight, quantize_weight

__version__ = "0.1.0"

__all__ = [
    "FPFormat", "encode", "decode", "pack", "unpack", "LAYOUT_VERSION", "QuantizedWeight", "quantize_weight",
    "fpx_linear", "FPxLinear", "quantize_model", "__version__",
]
