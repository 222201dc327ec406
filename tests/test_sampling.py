"""engine/sampling.py: ``sample``, the host reference with per-row settings and generators; DeviceSampler, what the
engine runs: per-slot settings on the device, noise hashed from (seed, position), no host traffic.

The distribution test draws 4,000 tokens from 8 known probabilities: each frequency is within 0.035 of its
probability (over 5 standard deviations of a binomial's, sqrt(p (1 - p) / n) <= 0.0079).
"""

import pytest
import torch

from fp6llm.engine.sampling import DeviceSampler, SamplingParams, exponential_noise, filter_logits, sample

VOCAB = 64


# ---- sample: settings and generators from the host ------------------------------------------------------------------

def test_sampling_is_deterministic_per_seed_and_row(gen):
    logits = torch.randn(4, VOCAB, generator=gen)
    params = [SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=s) for s in (1, 2, 3, 4)]

    def draw(rows):
        return sample(logits[rows], [params[i] for i in rows],
                      [params[i].make_generator("cpu") for i in rows]).tolist()

    assert draw([0, 1, 2, 3]) == draw([0, 1, 2, 3])
    # a row's token depends on its own seed only, not on its neighbours
    assert draw([0, 1, 2, 3])[2] == draw([2])[0]
    same_seed = sample(logits[:1].expand(64, -1), params[:1] * 64, [params[0].make_generator("cpu") for _ in range(64)])
    assert len(set(same_seed.tolist())) == 1
    different = sample(logits[:1].expand(64, -1), [SamplingParams(1.0, seed=s) for s in range(64)],
                       [SamplingParams(1.0, seed=s).make_generator("cpu") for s in range(64)])
    assert len(set(different.tolist())) > 1


def test_greedy_top_k_1_and_tiny_top_p_take_the_argmax(gen):
    logits = torch.randn(5, VOCAB, generator=gen)
    argmax = logits.argmax(dim=-1)
    for params in (SamplingParams(), SamplingParams(0.7, top_k=1, seed=0), SamplingParams(2.0, top_p=1e-6, seed=0)):
        rows = [params] * 5
        assert torch.equal(sample(logits, rows, [params.make_generator("cpu") for _ in rows]), argmax)


def test_filter_logits_keeps_top_k_and_the_smallest_top_p_set():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]] * 3))
    kept = filter_logits(logits, torch.ones(3), torch.tensor([5, 2, 5]), torch.tensor([1.0, 1.0, 0.8]))
    assert torch.isfinite(kept).sum(dim=-1).tolist() == [5, 2, 3]  # 0.5 + 0.2 < 0.8 <= 0.5 + 0.2 + 0.15
    # samples never leave the kept set
    params = [SamplingParams(1.0, top_p=0.8, seed=s) for s in range(200)]
    tokens = sample(logits[2:].expand(200, -1), params, [p.make_generator("cpu") for p in params])
    assert set(tokens.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_params_raise(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


# ---- DeviceSampler: settings on the device --------------------------------------------------------------------------

def draws(sampler: DeviceSampler, logits: torch.Tensor, positions, slots=None) -> torch.Tensor:
    """[rows, len(positions)]: each row's token drawn at each position (rows in slots 0.. unless ``slots``)."""
    slots = torch.arange(logits.shape[0]) if slots is None else torch.tensor(slots)
    return torch.stack([sampler(logits, slots, torch.full(slots.shape, p)) for p in positions], dim=1)


def test_a_rows_tokens_depend_only_on_its_seed_and_position(gen):
    logits = torch.randn(4, VOCAB, generator=gen)
    params = [SamplingParams(1.0, top_k=20, top_p=0.9, seed=s) for s in (5, 6, 7, 8)]
    batched = DeviceSampler(4, VOCAB, "cpu")
    for slot, p in enumerate(params):
        batched.set(slot, p, p.seed)
    together = draws(batched, logits, range(6))
    for slot, p in enumerate(params):
        alone = DeviceSampler(1, VOCAB, "cpu")
        alone.set(0, p, p.seed)
        assert torch.equal(draws(alone, logits[slot:slot + 1], range(6))[0], together[slot])
    assert len(set(together.flatten().tolist())) > 4  # the position moves the noise: not one token over and over
    assert torch.equal(draws(batched, logits, [3, 4]), together[:, 3:5])  # no state: a position draws alike again
    # rows in any slots, in any order, draw as their slots' settings say
    assert torch.equal(draws(batched, logits[[2, 0]], range(6), slots=[2, 0]), together[[2, 0]])


def test_greedy_rows_and_top_k_1_take_the_argmax_and_top_p_keeps_its_set(gen):
    logits = torch.randn(4, VOCAB, generator=gen)
    sampler = DeviceSampler(3, VOCAB, "cpu")
    sampler.set(0, SamplingParams(), 0)
    sampler.set(1, SamplingParams(0.8, top_k=1, seed=1), 1)
    sampler.set(2, SamplingParams(1.0, top_p=0.5, seed=2), 2)
    tokens = draws(sampler, logits, range(50), slots=[0, 1, 2, sampler.padding_slot])
    assert (tokens[[0, 1, 3]] == logits[[0, 1, 3]].argmax(-1)[:, None]).all()  # the padding slot is greedy
    probs = logits[2].softmax(-1)
    order = probs.argsort(descending=True)
    kept = order[: int((probs[order].cumsum(0) < 0.5).sum()) + 1]
    assert set(tokens[2].tolist()) <= set(kept.tolist())
    assert torch.equal(sampler(logits[:3], torch.arange(3), torch.zeros(3, dtype=torch.long), sampling=False),
                       logits[:3].argmax(-1))


def test_draws_follow_the_softmax(gen):
    logits = torch.randn(1, 8, generator=gen)
    sampler = DeviceSampler(1, 8, "cpu")
    sampler.set(0, SamplingParams(1.0), int(torch.randint(0, 2**62, (1,), generator=gen)))
    tokens = draws(sampler, logits, range(4000))[0]
    frequency = torch.bincount(tokens, minlength=8).float() / tokens.numel()
    assert (frequency - logits[0].softmax(-1)).abs().max() < 0.035


def test_noise_is_exponential_and_a_pure_function():
    seeds, positions = torch.tensor([0, 1, -(2**62)]), torch.tensor([0, 0, 9])
    noise = exponential_noise(seeds, positions, 20000)
    assert torch.equal(noise, exponential_noise(seeds, positions, 20000)) and (noise > 0).all()
    assert ((noise.mean(1) - 1).abs() < 0.05).all() and not torch.equal(noise[0], noise[1])


def test_bad_logits_and_slots_are_refused():
    sampler = DeviceSampler(2, VOCAB, "cpu")
    with pytest.raises(ValueError, match=r"logits must be \[rows, 64\] .* got logits \(3, 64\), slots \(2,\)"):
        sampler(torch.zeros(3, VOCAB), torch.arange(2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="slot must be in 0..1, got 2"):
        sampler.set(2, SamplingParams(), 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_a_cuda_graph_captures_the_sampling_step_without_a_sync():
    logits = torch.randn(4, VOCAB, device="cuda")
    sampler = DeviceSampler(4, VOCAB, "cuda")
    for slot in range(4):
        sampler.set(slot, SamplingParams(1.0, top_k=10), slot)
    slots, positions = torch.arange(4, device="cuda"), torch.zeros(4, dtype=torch.long, device="cuda")
    eager = []
    for step in range(3):
        eager.append(sampler(logits, slots, positions + step))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host synchronization raises
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            tokens = sampler(logits, slots, positions)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    replayed = []
    for step in range(3):
        positions.fill_(step)
        graph.replay()
        replayed.append(tokens.clone())
    assert torch.equal(torch.stack(replayed), torch.stack(eager))
