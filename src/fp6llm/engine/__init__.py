"""Generation: sampling, tokenizers, the Engine (paged KV cache, one batching scheduler, CUDA-graph decode), load."""

from .batcher import Request
from .generate import Delta, Engine, Event, Stats
from .load import DoesNotFit, ModelSource, load
from .sampling import SamplingParams, TokenLogprob, sample
from .tokenizer import ByteTokenizer, TextStream, load_tokenizer

__all__ = ["Engine", "Request", "Event", "Delta", "Stats", "SamplingParams", "TokenLogprob", "sample", "ByteTokenizer",
           "TextStream", "load_tokenizer", "load", "ModelSource", "DoesNotFit"]
