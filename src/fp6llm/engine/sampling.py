"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus), batched, per-row settings.

Each row of a batch has its own SamplingParams and, when it samples, its own torch.Generator: a row's tokens depend
only on its logits and its seed, not on which other requests share the batch (what a server with continuous batching
needs, and what makes batched generation reproduce one-by-one generation).

A sample is drawn as argmax(probs / q) with q ~ Exponential(1) per vocabulary entry: the same distribution as
torch.multinomial, without a device-to-host synchronization (gpt-fast's ``multinomial_sample_one_no_sync``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens.

    temperature: 0 means greedy (argmax); > 0 divides the logits before the softmax.
    top_k: keep the k most likely tokens (None or 0: all). top_p: keep the smallest set of most likely tokens whose
    probability sums to at least top_p (None or 1.0: all). seed: seeds the request's generator (None: a random seed).
    Raises ValueError for a negative temperature or top_k, or a top_p outside (0, 1].
    """

    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None

    def __post_init__(self):
        if not self.temperature >= 0:  # also refuses NaN
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"top_k must be a non-negative int (0 or None = off), got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 or None = off), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def make_generator(self, device) -> Optional[torch.Generator]:
        """A generator on ``device`` seeded with ``seed`` (a fresh random seed without one); None when greedy."""
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else random.SystemRandom().randrange(2**63)
        return torch.Generator(device=device).manual_seed(seed)


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
