"""Quality of quantized causal LMs: GGUF conversion, fake-quantized baselines, perplexity / KL / argmax, plans."""
