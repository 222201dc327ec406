"""Generation: sampling, tokenizers, the slot-based Engine (static KV cache, CUDA-graph decode) and ``load``."""

from .generate import Delta, Engine, Request, Stats
from .load import DoesNotFit, ModelSource, load
from .sampling import SamplingParams, sample
from .tokenizer import ByteTokenizer, TextStream, load_tokenizer

__all__ = ["Engine", "Request", "Delta", "Stats", "SamplingParams", "sample", "ByteTokenizer", "TextStream",
           "load_tokenizer", "load", "ModelSource", "DoesNotFit"]
