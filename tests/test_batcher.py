"""The engine's scheduler over the paged cache: the block allocator, admission by free blocks, preemption with
recomputation, chunked prefill, stop ids / stop strings / max_new_tokens at every step — each run's greedy tokens
against the same prompts run alone.

tiny-llama in float32 (seeded, build_random seed 0); prompts are fresh random token ids each run (``gen``).
"""

import pytest
import torch

from fp6llm.cli import main
from fp6llm.engine import ByteTokenizer, Engine, Request
from fp6llm.engine.blocks import BlockAllocator, OutOfBlocks
from fp6llm.models import build_random
from fp6llm.models.attention import BLOCK_SIZE, NULL_BLOCK

VOCAB = 512


@pytest.fixture(scope="module")
def model():
    return build_random("tiny-llama", "fp32", "cpu", seed=0, progress=False)


def prompts_of(gen, lengths):
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def run_all(engine, requests, max_steps=10_000):
    """Step until every request has finished; returns the events of each step."""
    engine.add(requests)
    steps = []
    while engine.active:
        steps.append(engine.step())
        assert len(steps) < max_steps
    return steps


def alone(model, prompt, max_new_tokens, **request):
    engine = Engine(model, None, max_batch_size=1, max_seq_len=96)
    solo = Request(prompt, max_new_tokens, **request)
    run_all(engine, [solo])
    return solo.output_ids


def test_allocator_hands_out_every_block_but_the_scratch_one_and_refuses_double_frees():
    allocator = BlockAllocator(6)
    blocks = allocator.allocate(3) + allocator.allocate(2)
    assert sorted(blocks) == [1, 2, 3, 4, 5] and NULL_BLOCK not in blocks and allocator.num_free == 0
    with pytest.raises(OutOfBlocks):
        allocator.allocate(1)
    allocator.free(blocks[:2])
    assert allocator.allocate(2) == blocks[:2]  # freed blocks are handed out again
    with pytest.raises(ValueError, match="block 0 is not allocated"):
        allocator.free([0])
    allocator.free([3])
    with pytest.raises(ValueError, match="block 3 is not allocated"):
        allocator.free([3])


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 4])
def test_every_max_new_tokens_and_eos_at_every_step(model, gen, max_new_tokens):
    """Issue 16: a request that finishes on its first decode step was removed twice. Every length 1..4 and a stop id
    at every step, through generate() and the step API."""
    tokenizer = ByteTokenizer(VOCAB)
    engine = Engine(model, tokenizer, max_batch_size=2, max_seq_len=64)
    prompt = "".join(chr(c) for c in torch.randint(32, 127, (9,), generator=gen).tolist())
    free = Request(tokenizer.encode(prompt), max_new_tokens)
    run_all(engine, [free])
    free_run = free.output_ids
    assert len(free_run) == max_new_tokens and free.finish_reason == "length"
    # generate() stops at the tokenizer's EOS, which a random model may draw (a bare Request has no stop ids)
    until_eos = next((i for i, t in enumerate(free_run) if t in tokenizer.eos_token_ids), len(free_run))
    text = tokenizer.decode(free_run[:until_eos])
    assert engine.generate(prompt, max_new_tokens=max_new_tokens) == [text]
    assert engine.generate([prompt, prompt[:4]], max_new_tokens=max_new_tokens)[0] == text
    for stop_at in range(max_new_tokens):
        stopped = Request(tokenizer.encode(prompt), max_new_tokens, stop_ids=frozenset([free_run[stop_at]]))
        steps = run_all(engine, [stopped])
        first = free_run.index(free_run[stop_at])
        assert stopped.finish_reason == "stop" and stopped.output_ids == free_run[:first]
        assert [e.finish_reason for step in steps for e in step] == [None] * first + ["stop"]
    assert engine.free_blocks == engine.num_blocks - 1
    assert main(["generate", "--random", "tiny-llama", "--prompt", "hi", "--max-new-tokens",
                 str(max_new_tokens)]) == 0


def test_preempted_requests_are_recomputed_and_still_match_their_solo_runs(model, gen):
    """A cache of 7 blocks (6 usable, 96 positions) for 4 requests that need 3 blocks each at the end: decoding runs
    out, the newest give their blocks back, are prefilled again (prompt + output so far) and go on."""
    prompts = prompts_of(gen, (20, 14, 25, 9))
    engine = Engine(model, None, max_batch_size=4, max_seq_len=96, num_blocks=7)
    requests = [Request(p, 20) for p in prompts]
    run_all(engine, requests)
    assert sum(r.preemptions for r in requests) > 0
    assert [r.output_ids for r in requests] == [alone(model, p, 20) for p in prompts]
    assert engine.free_blocks == 6


def test_admission_waits_for_free_blocks(model, gen):
    """Requests are admitted while the free blocks hold their prompts: the third waits until one ends."""
    engine = Engine(model, None, max_batch_size=4, max_seq_len=64, num_blocks=1 + 5)
    requests = [Request(p, 4) for p in prompts_of(gen, (2 * BLOCK_SIZE,) * 3)]
    engine.add(requests)
    engine.step()
    assert engine.num_running == 2 and engine.num_waiting == 1 and engine.free_blocks == 1
    while engine.active:
        engine.step()
    assert all(r.finish_reason == "length" for r in requests)


def test_chunked_prefill_equals_whole_prefill_and_decodes_meanwhile(model, gen):
    """A step budget of 9 tokens: a 40-token prompt is prefilled over several steps while the running request
    keeps decoding one token per step."""
    prompts = prompts_of(gen, (6, 40))
    engine = Engine(model, None, max_batch_size=2, max_seq_len=96, max_step_tokens=9)
    first, second = Request(prompts[0], 12), Request(prompts[1], 8)
    engine.add([first])
    engine.step()
    engine.add([second])
    while len(second.output_ids) == 0:
        before = len(first.output_ids)
        engine.step()
        assert len(first.output_ids) == before + 1  # never stalled by the long prompt
    while engine.active:
        engine.step()
    assert first.output_ids == alone(model, prompts[0], 12)
    assert second.output_ids == alone(model, prompts[1], 8)


def test_stop_strings_end_the_completion_in_the_engine(model, gen):
    tokenizer = ByteTokenizer(VOCAB)
    engine = Engine(model, tokenizer, max_batch_size=2, max_seq_len=96)
    prompt = "".join(chr(c) for c in torch.randint(97, 123, (12,), generator=gen).tolist())
    full = engine.generate(prompt, max_new_tokens=30)[0]
    stop = full[10:12]
    cut = full[:full.index(stop)]
    assert engine.generate([prompt, prompt + "x"], max_new_tokens=30, stop=[stop])[0] == cut
    deltas = list(engine.stream(prompt, max_new_tokens=30, stop=[stop]))
    assert "".join(d.text for d in deltas) == cut and deltas[-1].finish_reason == "stop"
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        Engine(model, None, max_seq_len=32).add([Request([5], 3, stop_strings=("a",))])


def test_a_cache_smaller_than_one_sequence_is_refused(model):
    with pytest.raises(ValueError, match=r"holds less than one sequence of max_seq_len 64 \(4 blocks \+ 1 scratch\)"):
        Engine(model, None, max_seq_len=64, num_blocks=4)


def test_more_sequences_run_than_a_static_cache_of_the_same_memory_held(model, gen):
    """17 blocks are the memory of a static cache of 4 rows x 64 positions; 12 short requests (one block each) run
    in it at once, each still its solo run."""
    engine = Engine(model, None, max_batch_size=16, max_seq_len=64, num_blocks=1 + 4 * 4)
    prompts = prompts_of(gen, torch.randint(3, 11, (12,), generator=gen).tolist())
    requests = [Request(p, 6) for p in prompts]
    engine.add(requests)
    engine.step()
    assert engine.num_running == 12 and engine.free_blocks == 4
    while engine.active:
        engine.step()
    assert all(r.preemptions == 0 for r in requests)
    assert [r.output_ids for r in requests[:3]] == [alone(model, p, 6) for p in prompts[:3]]


def test_random_arrivals_aborts_and_a_tight_cache_never_mix_requests(model, gen):
    """Requests arrive at random steps into a cache that must preempt, with a small step budget (chunked prefill)
    and one abort; every request that finishes has its solo tokens."""
    engine = Engine(model, None, max_batch_size=4, max_seq_len=64, num_blocks=1 + 6, max_step_tokens=12)
    lengths = torch.randint(1, 30, (7,), generator=gen).tolist()
    new_tokens = torch.randint(1, 20, (7,), generator=gen).tolist()
    new_tokens[3] = max(new_tokens[3], 3)  # the aborted one: still running two steps after it arrived
    arrivals = sorted(torch.randint(0, 12, (7,), generator=gen).tolist())
    requests = [Request(p, n) for p, n in zip(prompts_of(gen, lengths), new_tokens)]
    aborted = requests[3]
    step = 0
    while step <= max(arrivals) or engine.active:
        engine.add([r for r, at in zip(requests, arrivals) if at == step])
        if step == arrivals[3] + 2 and not aborted.finished:
            engine.abort(aborted)
        engine.step()
        step += 1
        assert step < 1000
    assert aborted.finish_reason == "abort"
    for request in requests:
        if request is not aborted:
            assert request.finish_reason == "length"
            assert request.output_ids == alone(model, request.prompt_ids, request.max_new_tokens)
    assert engine.free_blocks == 6


def test_prompts_with_a_common_prefix_share_its_cached_blocks(model, gen):
    """Three prompts start with the same 40 tokens: once the first is prefilled, the others share its two full
    blocks (32 tokens; the third block is partial) and compute only the rest; all match their solo runs. A block
    that nobody holds stays shareable until it is handed out again."""
    prefix, (tail_a, tail_b) = prompts_of(gen, (40,))[0], prompts_of(gen, (7, 3))
    prompts = [prefix + tail_a, prefix + tail_b, prefix]
    expected = [alone(model, p, 6) for p in prompts]  # first: one engine per model at a time
    engine = Engine(model, None, max_batch_size=4, max_seq_len=96)
    first = Request(prompts[0], 6)
    engine.add([first])
    engine.step()
    later = [Request(p, 6) for p in prompts[1:]]
    engine.add(later)
    engine.step()
    assert first.cached_tokens == 0 and [r.cached_tokens for r in later] == [32, 32]
    assert later[0].blocks[:2] == later[1].blocks[:2] == first.blocks[:2]
    while engine.active:
        engine.step()
    assert [r.output_ids for r in [first] + later] == expected
    again = Request(prompts[0], 6)
    run_all(engine, [again])  # every block was freed, the prefix's are still cached
    assert again.cached_tokens == 32 and again.output_ids == first.output_ids
    assert engine.free_blocks == engine.num_blocks - 1
