"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus), batched, per-row settings.

A row's tokens depend only on its logits and its seed, not on which other requests share the batch (what a server
with continuous batching needs, and what makes batched generation reproduce one-by-one generation).

A sample is drawn as argmax(probs / q) with q ~ Exponential(1) per vocabulary entry: the same distribution as
torch.multinomial, without a device-to-host synchronization (gpt-fast's ``multinomial_sample_one_no_sync``).

The engine samples with ``DeviceSampler``: every slot's settings live in device tensors, written once when a request
takes the slot, and the noise is a counter-based hash of (the request's seed, the position of the token drawn, the
vocabulary index) instead of a generator's state: a step is a fixed sequence of device ops with no host traffic, so
a CUDA graph captures it with the decode forward and the host reads only the new token ids. The guarantee of the
generator path it replaced (``sample``: a torch.Generator per request, seeded once, drawing one noise vector per
token, so a request's draws depended on its seed and its count of tokens only) holds: the draw of the token at
position p depends on the seed and p only, whatever else runs beside it, and after a preemption too. What changed:
a seed gives other tokens than it did with generators, and a seed's noise follows the token's position in the
sequence, not the count of tokens drawn (the same seed with a prompt one token longer draws other noise). ``sample``
stays as the host reference: the same filtering and the same greedy tokens.

``token_logprobs`` gives the log-probabilities that the OpenAI API reports: log_softmax of the model's own logits,
before temperature, top-k and top-p (as OpenAI and vLLM report them), of the chosen token and of the most likely ones.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

MAX_LOGPROBS = 20  # most likely alternatives reported per token (OpenAI's chat bound; vLLM's default max_logprobs)


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens.

    temperature: 0 means greedy (argmax); > 0 divides the logits before the softmax.
    top_k: keep the k most likely tokens (None or 0: all). top_p: keep the smallest set of most likely tokens whose
    probability sums to at least top_p (None or 1.0: all). seed: seeds the request's draws (None: a random seed).
    logprobs: report each generated token's logprob and its ``logprobs`` most likely alternatives (None: none).
    prompt_logprobs: the same for every prompt token after the first (None: none; it disables the prefix cache for
    the request, whose every position's logits are needed). Raises ValueError for a negative temperature or top_k,
    a top_p outside (0, 1], or logprobs / prompt_logprobs outside 0..MAX_LOGPROBS.
    """

    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None

    def __post_init__(self):
        if not self.temperature >= 0:  # also refuses NaN
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"top_k must be a non-negative int (0 or None = off), got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 or None = off), got {self.top_p}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an int in 0..{MAX_LOGPROBS} (None = off), got {value!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def make_generator(self, device) -> Optional[torch.Generator]:
        """A generator on ``device`` seeded with ``seed`` (a fresh random seed without one); None when greedy."""
        if self.greedy:
            return None
        return torch.Generator(device=device).manual_seed(self.draw_seed())

    def draw_seed(self) -> int:
        """``seed``, or a fresh random one (< 2**63) without one."""
        return self.seed if self.seed is not None else random.SystemRandom().randrange(2**63)


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
                  ) -> torch.Tensor:
    """Scaled logits with everything outside each row's top-k and top-p set to -inf.

    logits: float [B, V]; temperature: float [B] (> 0); top_k: int64 [B] (V keeps all); top_p: float [B] (1 keeps
    all). Returns float32 [B, V]. The most likely token of each row is always kept.
    """
    scaled = logits.float() / temperature[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(scaled.shape[-1], device=scaled.device)
    keep = rank[None, :] < top_k[:, None]
    sorted_probs = sorted_logits.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    # A token stays when the probability of the tokens ranked above it is still short of top_p.
    keep &= (sorted_probs.cumsum(dim=-1) - sorted_probs) < top_p[:, None]
    keep[:, 0] = True
    return torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits.masked_fill(~keep, float("-inf")))


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[Optional[torch.Generator]]) -> torch.Tensor:
    """The next token of each row: int64 [B] from logits float [B, V].

    params[i] and generators[i] belong to row i; greedy rows take the argmax (their generator may be None).
    """
    if logits.dim() != 2 or not len(params) == len(generators) == logits.shape[0]:
        raise ValueError(f"logits must be [B, V] with one SamplingParams and generator per row, got logits "
                         f"{tuple(logits.shape)}, {len(params)} params, {len(generators)} generators")
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled:
        return tokens
    vocab, device = logits.shape[-1], logits.device
    rows = [params[i] for i in sampled]
    temperature = torch.tensor([p.temperature for p in rows], device=device)
    top_k = torch.tensor([min(p.top_k or vocab, vocab) for p in rows], device=device)
    top_p = torch.tensor([1.0 if p.top_p is None else p.top_p for p in rows], device=device)
    probs = filter_logits(logits[sampled], temperature, top_k, top_p).softmax(dim=-1)
    noise = torch.stack([torch.empty(vocab, device=device).exponential_(generator=generators[i]) for i in sampled])
    tokens[sampled] = (probs / noise).argmax(dim=-1)
    return tokens


# splitmix64 (Steele, Lea & Flood 2014): a bijective mixer of 64-bit words whose outputs pass BigCrush; its
# constants as signed int64 (torch has no uint64 arithmetic; products wrap, as two's complement does).
GOLDEN_GAMMA = 0x9E3779B97F4A7C15 - 2**64
MIX1, MIX2 = 0xBF58476D1CE4E5B9 - 2**64, 0x94D049BB133111EB - 2**64
UNIFORM_BITS = 24  # a float32 uniform's mantissa


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical shift of int64 words (>> alone is arithmetic: it would copy the sign bit)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def exponential_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """float32 [B, vocab] of Exponential(1) draws, a pure function of (seeds[b], positions[b], vocabulary index).

    seeds, positions: int64 [B]. Word = splitmix64(seed + (position * vocab + index + 1) * GOLDEN_GAMMA): distinct
    (position, index) pairs of a row are distinct splitmix64 stream positions. Its top 24 bits give u in (0, 1),
    and -log(u) is the draw.
    """
    index = torch.arange(vocab, device=seeds.device)
    x = seeds[:, None] + ((positions[:, None] * vocab + index + 1) * GOLDEN_GAMMA)
    x = (x ^ _shift_right(x, 30)) * MIX1
    x = (x ^ _shift_right(x, 27)) * MIX2
    x = x ^ _shift_right(x, 31)
    uniform = (_shift_right(x, 64 - UNIFORM_BITS).float() + 0.5) * 2.0**-UNIFORM_BITS
    return -torch.log(uniform)


class DeviceSampler:
    """Sampling settings of ``max_batch_size`` slots in device tensors, and a sampling step on the device only.

    ``set(slot, params, seed)`` when a request takes a slot (a few bytes to the device, once). Then each call
    ``sampler(logits, slots, positions, sampling)`` takes logits [rows, V], the slot of each row (int64 [rows]) and
    the position in its sequence of the token each row draws (int64 [rows]), and returns the rows' next tokens,
    int64 [rows], on the device, with fixed shapes and no host traffic (capturable in a CUDA graph). A row's draw
    depends on its logits, seed and position only. sampling=False (no row samples) skips the sort and the noise:
    every row takes its argmax. Slot ``padding_slot`` (one beyond max_batch_size) is always greedy: the padding
    rows of a captured batch use it.
    """

    def __init__(self, max_batch_size: int, vocab_size: int, device):
        self.vocab_size, self.padding_slot = vocab_size, max_batch_size
        slots = max_batch_size + 1
        self.temperature = torch.zeros(slots, device=device)
        self.top_k = torch.full((slots,), vocab_size, dtype=torch.long, device=device)
        self.top_p = torch.ones(slots, device=device)
        self.seeds = torch.zeros(slots, dtype=torch.long, device=device)

    def set(self, slot: int, params: SamplingParams, seed: int) -> None:
        """Slot ``slot`` samples with ``params`` and ``seed`` (its request's drawn seed: ``draw_seed``)."""
        if not 0 <= slot < self.padding_slot:
            raise ValueError(f"slot must be in 0..{self.padding_slot - 1}, got {slot}")
        top_k = min(params.top_k or self.vocab_size, self.vocab_size)
        values = ((self.temperature, params.temperature), (self.top_k, top_k),
                  (self.top_p, 1.0 if params.top_p is None else params.top_p), (self.seeds, seed))
        for tensor, value in values:
            tensor[slot] = value

    def __call__(self, logits: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                 sampling: bool = True) -> torch.Tensor:
        rows = logits.shape[0]
        if logits.dim() != 2 or logits.shape[1] != self.vocab_size or slots.shape != (rows,) \
                or positions.shape != (rows,):
            raise ValueError(f"logits must be [rows, {self.vocab_size}] with slots and positions [rows], got logits "
                             f"{tuple(logits.shape)}, slots {tuple(slots.shape)}, positions {tuple(positions.shape)}")
        tokens = logits.argmax(dim=-1)
        if not sampling:
            return tokens
        temperature = self.temperature[slots]
        kept = filter_logits(logits, temperature.clamp_min(1e-6), self.top_k[slots], self.top_p[slots])
        noise = exponential_noise(self.seeds[slots], positions, self.vocab_size)
        return torch.where(temperature > 0, (kept.softmax(dim=-1) / noise).argmax(dim=-1), tokens)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability and the ``top`` most likely tokens at its position: ((token id, logprob), ...),
    most likely first."""

    token_id: int
    logprob: float
    top: tuple = ()

    def trimmed(self, count: int) -> "TokenLogprob":
        """The same with only the ``count`` most likely alternatives."""
        return TokenLogprob(self.token_id, self.logprob, self.top[:count])


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list:
    """TokenLogprob of each row's token: logits float [rows, V] (the model's, before temperature, top-k and top-p),
    tokens int64 [rows] on the same device, ``top`` alternatives each (0..MAX_LOGPROBS). One device-to-host copy."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, tokens[:, None])
    values, ids = logprobs.topk(top, dim=-1)
    # one copy: token ids below 2**24 are exact in float32 (vocabularies are far smaller)
    host = torch.cat([tokens[:, None].float(), chosen, values, ids.float()], dim=1).tolist()
    return [TokenLogprob(int(row[0]), row[1], tuple(zip(map(int, row[2 + top:]), row[2:2 + top]))) for row in host]
