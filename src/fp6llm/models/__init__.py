"""Compact decoders (Llama family, OPT, Gemma-3 text) with a static per-row KV cache, and their loading / packing."""

from .checkpoint import quantize_checkpoint, save_packed
from .config import NAMED_CONFIGS, ModelConfig
from .loader import build_model, build_random, load_hf, load_packed

__all__ = ["ModelConfig", "NAMED_CONFIGS", "build_model", "build_random", "load_hf", "load_packed",
           "save_packed", "quantize_checkpoint"]
