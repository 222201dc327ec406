"""fp6llm: serve LLMs with FP6 (and FPx) weights on NVIDIA GPUs. See README.md.

The names below are imported on first use (PEP 562), so that ``import fp6llm`` (and ``fp6llm --help``) does not
import torch until something needs it.
"""

import importlib
from typing import Optional


def package_version() -> Optional[str]:
    """fp6llm's version from its installed package metadata (pyproject.toml's, the one place it is written); None
    when there is none, as in a source tree that was never installed."""
    from importlib import metadata  # ~20 ms of imports: only when asked (`fp6llm` starts fast: its Ctrl-C handler
    try:  # is installed sooner)
        return metadata.version("fp6llm")
    except metadata.PackageNotFoundError:
        return None

# public name -> the module of fp6llm that defines it
_EXPORTS = {"FPFormat": "formats", "decode": "formats", "encode": "formats", "FPxLinear": "nn",
            "quantize_model": "nn", "fpx_linear": "ops", "LAYOUT_VERSION": "packing", "pack": "packing",
            "unpack": "packing", "QuantizedWeight": "quantize", "quantize_weight": "quantize"}


def __getattr__(name: str):
    """A public name (or a submodule, e.g. fp6llm.ops), imported when first asked for; __version__ read from the
    package metadata when first asked for ("0+unknown", a PEP 440 version that says it is not known, without)."""
    if name == "__version__":  # not kept: it follows the installed metadata (a reinstall, a test's stand-in)
        return package_version() or "0+unknown"
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif not name.startswith("__"):
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def load(path_or_random=None, fmt=None, group_size=None, device=None, dtype=None, **engine_options):
    """A ready text generator: ``fp6llm.load("random:tiny-llama").generate("Hello")``. See fp6llm.engine.load."""
    from .engine import load as load_engine
    return load_engine(path_or_random, fmt, group_size, device, dtype, **engine_options)


__all__ = [
    "FPFormat", "encode", "decode", "pack", "unpack", "LAYOUT_VERSION", "QuantizedWeight", "quantize_weight",
    "fpx_linear", "FPxLinear", "quantize_model", "load", "__version__",
]
