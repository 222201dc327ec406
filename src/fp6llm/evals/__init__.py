"""Evaluations, each on top of the engine and models: end-to-end throughput (throughput.py) and perplexity
(perplexity.py) of fp6llm's own models, the embedding fidelity of a sentence encoder (embeddings.py), the quality of
quantized causal LMs (GGUF conversion, fake-quantized baselines, perplexity / KL / argmax: lm.py; per-layer plans:
plan.py), and the one timing helper they and bench/ share (timing.py)."""
