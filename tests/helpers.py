"""Small helpers shared by several test files (the fixtures are in conftest.py)."""

import torch


def seed_of(gen: torch.Generator) -> int:
    """An int seed drawn from a test's generator, for what takes a seed rather than a generator (build_random,
    SamplingParams, numpy)."""
    return int(torch.randint(0, 2**31, (), generator=gen))


def seeded(gen: torch.Generator, make):
    """``make()`` with torch's global generator seeded from ``gen``, then restored: modules draw their initial
    weights from the global generator (nn.Linear, transformers' models), so this is how they become replayable
    without changing the draws of anything else. Each call draws a new seed."""
    with torch.random.fork_rng():
        torch.manual_seed(seed_of(gen))
        return make()


TINY_VOCAB = 512  # the vocabulary of the tiny-llama and tiny-opt random models
