"""Tokenizers for the engine: a checkpoint's own (transformers or tokenizers, offline), or bytes for random models.

A checkpoint is untrusted input: its tokenizer is built from data files only. transformers gets
``trust_remote_code=False`` (a tokenizer_config.json whose auto_map names the checkpoint's own Python is refused,
never run, and never prompted for), and nothing is unpickled.

Every tokenizer here has ``encode(text) -> list[int]`` (with the model's BOS when it uses one), ``decode(ids) -> str``
(special tokens left out) and ``eos_token_ids`` (a frozenset: generation stops on any of them). ``TextStream`` turns
a growing list of ids into text deltas for streaming.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Iterable

from ..models.checkpoint import TOKENIZER_FILES
from ..models.trust import read_json

log = logging.getLogger("fp6llm.tokenizer")

BYTE_OFFSET = 3  # ids 0, 1, 2 are PAD, BOS, EOS; byte b is id b + BYTE_OFFSET
BYTE_VOCAB = BYTE_OFFSET + 256
# Normalizers may compose characters (NFC: "e" + U+0301 -> "é"); allow this many input characters per output one.
NORMALIZER_SLACK = 2


class ByteTokenizer:
    """UTF-8 bytes as ids 3..258 after PAD=0, BOS=1, EOS=2: works for any model with vocab_size >= 259.

    Ids past 258 (a random model draws from its whole vocabulary) wrap around onto the bytes when decoded, so that
    every id shows as something; invalid UTF-8 decodes to U+FFFD.
    """

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __init__(self, vocab_size: int = BYTE_VOCAB):
        if vocab_size < BYTE_VOCAB:
            raise ValueError(f"the byte tokenizer needs vocab_size >= {BYTE_VOCAB}, the model has {vocab_size}")
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset([self.eos_token_id])

    def encode(self, text: str) -> list[int]:
        return [self.bos_token_id] + [byte + BYTE_OFFSET for byte in text.encode("utf-8")]

    def max_chars(self, tokens: int) -> int:
        """The most characters a text of ``tokens`` tokens can have: each character is at least one byte."""
        return tokens

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes((i - BYTE_OFFSET) % 256 for i in ids if i >= BYTE_OFFSET)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A transformers tokenizer or a bare tokenizers.Tokenizer, behind the engine's three names."""

    def __init__(self, tokenizer, eos_token_ids: Iterable[int]):
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self._bare = not hasattr(tokenizer, "batch_decode")  # tokenizers.Tokenizer rather than transformers'

    def encode(self, text: str) -> list[int]:
        if self._bare:
            return self.tokenizer.encode(text).ids
        return self.tokenizer.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @functools.cached_property
    def longest_token(self) -> int:
        """Characters of the vocabulary's longest token: no token stands for more characters of text (a byte-level
        token's string has a character per byte)."""
        vocab = self.tokenizer.get_vocab(True) if self._bare else self.tokenizer.get_vocab()
        return max(map(len, vocab), default=1)

    def max_chars(self, tokens: int) -> int:
        """An upper bound on the characters of a text of ``tokens`` tokens: to refuse a text too long for the
        context before spending the time to encode it."""
        return tokens * self.longest_token * NORMALIZER_SLACK


def load_tokenizer(model_dir: "str | Path") -> HFTokenizer:
    """The tokenizer saved with a checkpoint, read offline.

    Tries transformers.AutoTokenizer (local_files_only) and falls back to tokenizers' tokenizer.json. eos_token_ids
    holds the tokenizer's own EOS (the engine adds the model config's, e.g. LLaMA 3's second one). Raises
    FileNotFoundError when the directory holds no tokenizer files.
    """
    model_dir = Path(model_dir)
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer in {model_dir} (looked for {', '.join(TOKENIZER_FILES)}); copy the "
                                f"tokenizer files of the original checkpoint there")
    try:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
        return HFTokenizer(tokenizer, [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id])
    except Exception as err:  # transformers missing, custom code refused, or no tokenizer it can build offline
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"cannot load the tokenizer of {model_dir}: transformers failed ({reason}) and there "
                                f"is no tokenizer.json")
    log.info("transformers could not load the tokenizer of %s (%s); reading tokenizer.json", model_dir, reason)
    from tokenizers import Tokenizer
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for a file it cannot parse
        raise ValueError(f"{path} is not a tokenizer: {str(err).splitlines()[0] if str(err) else err!r}") from None
    config_path = model_dir / "tokenizer_config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    eos_token = config.get("eos_token") if isinstance(config, dict) else None
    if isinstance(eos_token, dict):  # older files: {"content": "</s>", ...}
        eos_token = eos_token.get("content")
    eos_id = tokenizer.token_to_id(eos_token) if isinstance(eos_token, str) else None
    return HFTokenizer(tokenizer, [] if eos_id is None else [eos_id])


class TextStream:
    """Text deltas of a growing id list, decoded in context so that spaces and multi-byte characters come out right.

    ``push(ids)`` takes the ids generated so far and returns the text they add (possibly ""): a delta is held back
    while it ends in an incomplete UTF-8 sequence (U+FFFD). Each push decodes only the last few ids.
    """

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        # Start the decoding context at the prompt's last ids: a leading space of the first new token is kept.
        context = prompt_ids[-4:]
        self.ids = list(context)
        self.prefix_offset, self.read_offset = 0, len(context)

    def push(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix_text):]

    def flush(self) -> str:
        """The text held back so far (an incomplete character included): call once, at the end."""
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix_text):]


class StopStrings:
    """The text of a completion up to its first stop string, released piece by piece without showing part of one.

    ``feed(text)`` returns (text safe to show, whether a stop string was reached); the stop string itself and what
    follows it are dropped. ``flush()`` releases what is held back, at the end.
    """

    def __init__(self, stops: list):
        self.stops = [s for s in stops if s]
        self.held = ""  # the end of the text so far that is the start of a stop string

    def feed(self, text: str) -> tuple:
        if not self.stops:
            return text, False
        self.held += text
        found = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if found:
            safe, self.held = self.held[:min(found)], ""
            return safe, True
        keep = max(self._prefix_at_end(s) for s in self.stops)
        safe, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return safe, False

    def _prefix_at_end(self, stop: str) -> int:
        """Length of the longest proper prefix of ``stop`` that the held text ends with."""
        for length in range(min(len(stop) - 1, len(self.held)), 0, -1):
            if self.held.endswith(stop[:length]):
                return length
        return 0

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


class CompletionText:
    """One request's text as its tokens come: TextStream's deltas through its StopStrings.

    ``push(new_ids, last)`` returns (text to show, whether a stop string was reached); with last=True (the request
    ends with these ids) everything held back is released.
    """

    def __init__(self, tokenizer, prompt_ids: list, stop_strings=()):
        self.stream, self.stops = TextStream(tokenizer, prompt_ids), StopStrings(list(stop_strings))

    def push(self, new_ids: list, last: bool) -> tuple:
        text = self.stream.push(new_ids)
        if last:
            text += self.stream.flush()
        text, stopped = self.stops.feed(text)
        if last and not stopped:
            text += self.stops.flush()
        return text, stopped
