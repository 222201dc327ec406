"""fp6llm: serve LLMs with FP6 (and FPx) weights on NVIDIA GPUs. See README.md."""

from .formats import FPFormat, decode, encode
from .nn import FPxLinear, quantize_model
from .ops import fpx_linear
from .packing import LAYOUT_VERSION, pack, unpack
from .quantize import QuantizedWeight, quantize_weight

__version__ = "0.1.0"


def load(path_or_random=None, fmt=None, group_size=None, device=None, dtype=None, **engine_options):
    """A ready text generator: ``fp6llm.load("random:tiny-llama").generate("Hello")``. See fp6llm.engine.load.

    Imported on first call, so that ``import fp6llm`` stays light.
    """
    from .engine import load as load_engine
    return load_engine(path_or_random, fmt, group_size, device, dtype, **engine_options)


__all__ = [
    "FPFormat", "encode", "decode", "pack", "unpack", "LAYOUT_VERSION", "QuantizedWeight", "quantize_weight",
    "fpx_linear", "FPxLinear", "quantize_model", "load", "__version__",
]
