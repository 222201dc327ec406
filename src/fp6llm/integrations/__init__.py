"""fp6llm inside other tools: a Hugging Face transformers quantizer (hf.py) and an lm-evaluation-harness model
(lmeval.py). Each module imports its tool on import; ``import fp6llm`` imports neither."""
