"""The engine samples on the device, inside the decode step (engine/sampling.py's DeviceSampler; on CUDA in the
captured graph, here the same ops eagerly): greedy rows equal the host sampler token for token, a seeded request's
tokens are its own whatever shares the batch (and after a preemption), top-k 1 is greedy, temperature draws follow
the softmax, and a decode step reads the device once (the new token ids).

Random models are seeded (build_random seed 0); prompts are fresh random token ids each run (``gen``). The
distribution test draws 4,000 tokens over 8 entries: each frequency is within 0.035 of its probability (over 5
standard deviations of a binomial's, sqrt(p (1 - p) / n) <= 0.0079).
"""

import collections
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fp6llm.engine import Engine, Request, SamplingParams, sample
from fp6llm.engine.sampling import DeviceSampler
from fp6llm.models import build_random

VOCAB = 512
SAMPLED = dict(temperature=0.9, top_k=40, top_p=0.95)
# aten ops whose result the host must wait for (.item(), and the ops whose output shape depends on the data)
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "repeat_interleave"}


@pytest.fixture(scope="module")
def model():
    return build_random("tiny-llama", "fp32", "cpu", seed=0, progress=False)


def prompts_of(gen, count, lowest=3, highest=30):
    lengths = torch.randint(lowest, highest, (count,), generator=gen).tolist()
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def run(engine, requests, later=(), join_at=2):
    """Step until every request has finished; ``later`` requests join after ``join_at`` steps."""
    engine.add(requests)
    steps = 0
    while engine.active or (later and steps <= join_at):
        if steps == join_at and later:
            engine.add(later)
        engine.step()
        steps += 1
        assert steps < 10_000
    return [r.output_ids for r in [*requests, *later]]


def seeds_of(gen, count):
    return torch.randint(-2**62, 2**62, (count,), generator=gen).tolist()


def test_greedy_on_the_device_equals_the_host_sampler_token_for_token(model, gen, monkeypatch):
    """Every sampling call of a batch mixing greedy and sampled requests: the greedy rows' tokens are what the host
    sampler (``sample``, the previous path) picks from the same logits; and the greedy requests' tokens equal those
    of the same batch run all greedy (the argmax-only step)."""
    calls = []
    device_call = DeviceSampler.__call__

    def recorded(self, logits, slots, positions, sampling=True):
        tokens = device_call(self, logits, slots, positions, sampling)
        calls.append((logits.clone(), slots.clone(), tokens.clone(), sampling))
        return tokens

    monkeypatch.setattr(DeviceSampler, "__call__", recorded)
    prompts = prompts_of(gen, 4)
    engine = Engine(model, None, max_batch_size=4, max_seq_len=64)
    mixed = [Request(p, 12, SamplingParams(**SAMPLED, seed=s) if i % 2 else SamplingParams())
             for i, (p, s) in enumerate(zip(prompts, seeds_of(gen, 4)))]
    mixed_ids = run(engine, mixed)
    greedy_slots = {s for s in range(4) if engine.sampler.temperature[s] == 0}  # the slots keep their last settings
    assert len(greedy_slots) == 2 and any(sampling for *_, sampling in calls)
    for logits, slots, tokens, _ in calls:
        rows = [i for i, s in enumerate(slots.tolist()) if s in greedy_slots]
        host = sample(logits[rows], [SamplingParams()] * len(rows), [None] * len(rows))
        assert torch.equal(tokens[rows], host)
    calls.clear()
    all_greedy_ids = run(engine, [Request(p, 12) for p in prompts])
    assert not any(sampling for *_, sampling in calls)
    assert all_greedy_ids[0::2] == mixed_ids[0::2]


def test_a_seeded_request_draws_the_same_tokens_whatever_shares_the_batch(model, gen):
    prompts, seeds = prompts_of(gen, 4), seeds_of(gen, 4)
    alone = run(Engine(model, None, max_batch_size=1, max_seq_len=64),
                [Request(prompts[0], 16, SamplingParams(**SAMPLED, seed=seeds[0]))])[0]
    assert len(set(alone)) > 1
    # beside three others, one greedy, two joining later, in slots other than the one it had alone
    engine = Engine(model, None, max_batch_size=4, max_seq_len=64)
    first = [Request(prompts[1], 8), Request(prompts[0], 16, SamplingParams(**SAMPLED, seed=seeds[0]))]
    later = [Request(p, 12, SamplingParams(1.3, seed=s)) for p, s in zip(prompts[2:], seeds[2:])]
    together = run(engine, first, later)
    assert first[1].slot == -1 and together[1] == alone
    # again in the same engine: the same tokens (nothing of the last run stays in the slots)
    assert run(engine, [Request(prompts[0], 16, SamplingParams(**SAMPLED, seed=seeds[0]))])[0] == alone
    other_seeds = [run(engine, [Request(prompts[0], 16, SamplingParams(**SAMPLED, seed=s))])[0]
                   for s in seeds_of(gen, 3)]
    assert any(ids != alone for ids in other_seeds)


def test_a_preempted_seeded_request_draws_on_as_it_would_have(model, gen):
    """7 blocks (6 usable) for 4 requests of 3 blocks each at the end: the newest are preempted, prefilled again and
    sample again from a new slot; their draws depend on seed and position only."""
    prompts, seeds = prompts_of(gen, 4, 9, 26), seeds_of(gen, 4)
    params = [SamplingParams(**SAMPLED, seed=s) for s in seeds]
    tight = Engine(model, None, max_batch_size=4, max_seq_len=96, num_blocks=7)
    requests = [Request(p, 20, sp) for p, sp in zip(prompts, params)]
    ids = run(tight, requests)
    assert sum(r.preemptions for r in requests) > 0
    solo = Engine(model, None, max_batch_size=1, max_seq_len=96)
    assert ids == [run(solo, [Request(p, 20, sp)])[0] for p, sp in zip(prompts, params)]


def test_top_k_1_is_greedy(model, gen):
    prompt, seed = prompts_of(gen, 1)[0], seeds_of(gen, 1)[0]
    engine = Engine(model, None, max_batch_size=3, max_seq_len=64)
    greedy, hot, cold = run(engine, [Request(prompt, 16), Request(prompt, 16, SamplingParams(1.9, top_k=1, seed=seed)),
                                     Request(prompt, 16, SamplingParams(0.05, top_k=1, top_p=0.5, seed=seed))])
    assert hot == greedy and cold == greedy


def test_temperature_and_top_k_draws_follow_the_softmax(gen):
    logits = torch.randn(1, 8, generator=gen) * 2
    sampler = DeviceSampler(2, 8, "cpu")
    sampler.set(1, SamplingParams(0.7, top_k=6), seeds_of(gen, 1)[0])
    count = 4000
    tokens = sampler(logits.expand(count, -1), torch.ones(count, dtype=torch.long), torch.arange(count))
    frequency = torch.bincount(tokens, minlength=8).float() / count
    scaled = logits[0] / 0.7
    kept = scaled.topk(6).indices
    expected = torch.zeros(8)
    expected[kept] = scaled[kept].softmax(-1)
    assert (frequency - expected).abs().max() < 0.035 and frequency[expected == 0].sum() == 0


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func._schema.name.partition("::")[2]] += 1
        return func(*args, **(kwargs or {}))


def test_a_decode_step_reads_the_device_once(model, gen, monkeypatch):
    """Decode steps of sampled and greedy requests: one .tolist() each (the new token ids), no other read of a
    tensor's value on the host, and no op whose output shape waits for the data."""
    engine = Engine(model, None, max_batch_size=4, max_seq_len=64)
    requests = [Request(p, 8, SamplingParams(**SAMPLED, seed=s) if i else SamplingParams())
                for i, (p, s) in enumerate(zip(prompts_of(gen, 3), seeds_of(gen, 3)))]
    engine.add(requests)
    engine.step()  # the prefill
    reads = collections.Counter()
    for name in ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        def counted(self, *args, _original=getattr(torch.Tensor, name), _name=name, **kwargs):
            reads[_name] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    steps = 4
    with CountOps() as dispatched:
        for _ in range(steps):
            events = engine.step()
            assert len(events) == 3 and all(e.token_ids for e in events)
    monkeypatch.undo()
    assert dict(reads) == {"tolist": steps}
    assert not SYNCING_OPS & set(dispatched.ops), dispatched.ops
    assert dispatched.ops["sort"] == steps  # the sampling step ran (a greedy-only batch skips the sort)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_a_captured_decode_step_synchronizes_once_on_cuda(gen):
    """On CUDA the step replays the graph of forward + sampling; the host waits once per step, for the ids."""
    model = build_random("tiny-llama", "e3m2", "cuda", seed=0, progress=False)
    engine = Engine(model, None, max_batch_size=4, max_seq_len=64)
    engine.warm_up()
    requests = [Request(p, 8, SamplingParams(**SAMPLED, seed=s)) for p, s in zip(prompts_of(gen, 3), seeds_of(gen, 3))]
    engine.add(requests)
    engine.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(4):
                engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len([w for w in caught if "synchroniz" in str(w.message)]) == 4
    assert all(len(r.output_ids) == 5 for r in requests)
