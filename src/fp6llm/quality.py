"""The embedding fidelity check lives in fp6llm.evals.embeddings; this name, which docs/quality.md's runs used,
is the same module."""

import sys

from .evals import embeddings

sys.modules[__name__] = embeddings
