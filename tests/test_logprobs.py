"""Logprobs: the engine's (generated tokens' and prompt tokens', SamplingParams.logprobs / prompt_logprobs) against
log_softmax of a plain forward pass of the model over the whole sequence, and the server's OpenAI shapes of them
(completions' logprobs and echo, as lm-evaluation-harness's local-completions asks: echo, max_tokens 0; chat's
logprobs + top_logprobs), whole and streamed, through an in-process app.

tiny-llama in float32 (seeded, build_random seed 0); prompts are fresh random each run (``gen``). Tolerance: 1e-4
absolute on a logprob (about -6 here): the engine's paged forward and the plain one sum in other orders, in float32.
"""

import asyncio
import copy
import itertools
import json

import pytest
import torch

from fp6llm.engine import Engine, Request, SamplingParams, load
from fp6llm.models import build_random

VOCAB = 512
TOL = 1e-4

for module in ("fastapi", "httpx"):
    pytest.importorskip(module)

import httpx  # noqa: E402

from fp6llm.server.app import chat_prompt_ids, create_app  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return build_random("tiny-llama", "fp32", "cpu", seed=0, progress=False)


def reference(model, ids: list) -> torch.Tensor:
    """float64 [len(ids), vocab]: log_softmax of a plain forward's logits at each position (predicting the next)."""
    model.setup_caches(1, len(ids) + 1)
    with torch.inference_mode():
        return model(torch.tensor([ids]), torch.arange(len(ids))[None])[0].double().log_softmax(-1)


def prompt_of(gen, length):
    return torch.randint(3, VOCAB, (length,), generator=gen).tolist()


def run(engine, requests) -> dict:
    """Step until every request has finished; {request: its Events}."""
    engine.add(requests)
    events = {r: [] for r in requests}
    while engine.active:
        for event in engine.step():
            events[event.request].append(event)
    return events


def check(found, expected: torch.Tensor, token: int, top: int) -> None:
    """An engine TokenLogprob against the reference distribution at its position."""
    assert found.token_id == token and abs(found.logprob - expected[token]) < TOL
    ids, values = [t for t, _ in found.top], torch.tensor([v for _, v in found.top], dtype=torch.float64)
    assert len(ids) == top and len(set(ids)) == top
    if top:
        assert (values - expected[ids]).abs().max() < TOL
        assert (values.diff() <= TOL).all() and abs(values[0] - expected.max()) < TOL
        assert values[-1] >= expected.topk(top).values[-1] - TOL  # none more likely left out


def test_generated_and_prompt_logprobs_are_the_models_log_softmax(model, gen):
    """A sampled request (temperature 1.4, top-k 20: logprobs are of the model's own distribution, not of the
    sampler's), a greedy one and one that asks for nothing, in one batch."""
    engine = Engine(model, None, max_batch_size=3, max_seq_len=96)
    sampled = Request(prompt_of(gen, 21), 8, SamplingParams(1.4, top_k=20, seed=5, logprobs=5, prompt_logprobs=3))
    greedy = Request(prompt_of(gen, 9), 8, SamplingParams(logprobs=0))
    plain = Request(prompt_of(gen, 14), 8)
    events = run(engine, [sampled, greedy, plain])
    for request, top in ((sampled, 5), (greedy, 0)):
        logprobs = [lp for e in events[request] for lp in e.logprobs]
        assert len(logprobs) == len(request.output_ids) == 8
        expected = reference(model, request.prompt_ids + request.output_ids)
        start = len(request.prompt_ids)
        for j, (found, token) in enumerate(zip(logprobs, request.output_ids)):
            check(found, expected[start + j - 1], token, top)
            if request is greedy:
                assert abs(found.logprob - expected[start + j - 1].max()) < TOL
    prompt = sampled.prompt_ids
    assert len(sampled.prompt_logprobs) == len(prompt) and sampled.prompt_logprobs[0] is None
    expected = reference(model, prompt)
    for q in range(1, len(prompt)):
        check(sampled.prompt_logprobs[q], expected[q - 1], prompt[q], 3)
    assert greedy.prompt_logprobs is None and plain.prompt_logprobs is None
    assert all(e.logprobs == [] for e in events[plain])


def test_the_stop_id_that_ends_a_request_has_its_logprob(model, gen):
    """lm-evaluation-harness reads one logprob per drawn token (echo, max_tokens 1): an EOS drawn is one too, though
    it is not in the output."""
    prompt = prompt_of(gen, 11)
    engine = Engine(model, None, max_batch_size=1, max_seq_len=64)
    free = Request(prompt, 3, SamplingParams(logprobs=1))
    run(engine, [free])
    stop_id = free.output_ids[2]
    stopped = Request(prompt, 3, SamplingParams(logprobs=1), stop_ids=frozenset([stop_id]))
    events = run(engine, [stopped])[stopped]
    first = free.output_ids.index(stop_id)  # the stop id may come earlier already
    assert stopped.output_ids == free.output_ids[:first] and stopped.finish_reason == "stop"
    logprobs = [lp for e in events for lp in e.logprobs]
    assert [lp.token_id for lp in logprobs] == free.output_ids[:first + 1]
    expected = reference(model, prompt + free.output_ids)
    check(logprobs[-1], expected[len(prompt) + first - 1], stop_id, 1)


def test_a_scored_prompt_is_computed_whole_in_chunks_past_a_cached_prefix(model, gen, monkeypatch):
    """max_new_tokens 0 with prompt_logprobs: the prompt's logprobs are the answer. The same prompt ran before (its
    blocks are in the prefix cache), yet every position is computed; chunks of 8 tokens (SCORING_CHUNK)."""
    import fp6llm.engine.batcher
    monkeypatch.setattr(fp6llm.engine.batcher, "SCORING_CHUNK", 8)
    prompt = prompt_of(gen, 45)
    engine = Engine(model, None, max_batch_size=2, max_seq_len=96)
    run(engine, [Request(prompt, 2)])
    cached = Request(prompt, 2)
    run(engine, [cached])
    assert cached.cached_tokens > 0  # the prefix cache holds the prompt's full blocks
    scored = Request(prompt, 0, SamplingParams(prompt_logprobs=1))
    events = run(engine, [scored])[scored]
    assert scored.cached_tokens == 0 and scored.output_ids == []
    assert [(e.token_ids, e.finish_reason) for e in events] == [([], "length")]
    expected = reference(model, prompt)
    assert len(scored.prompt_logprobs) == len(prompt)
    for q in range(1, len(prompt)):
        check(scored.prompt_logprobs[q], expected[q - 1], prompt[q], 1)
    assert engine.free_blocks == engine.num_blocks - 1


def test_max_new_tokens_0_and_bad_logprobs_are_refused(model):
    engine = Engine(model, None, max_batch_size=1, max_seq_len=32)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        engine.request([5, 6], 0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):
        engine.request([5, 6], -1, SamplingParams(prompt_logprobs=0))
    for bad in (dict(logprobs=21), dict(prompt_logprobs=-1), dict(logprobs=1.0)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be an int in 0..20"):
            SamplingParams(**bad)


# ---- the server ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine():
    return load("random:tiny-llama", "fp32", device="cpu", max_batch_size=2, max_seq_len=128, progress=False)


def post_all(engine, requests: list) -> list:
    """The answers of (path, body) requests, one after the other, through a new app over ``engine``: the JSON
    answer, or the server-sent events' JSON chunks of a stream."""
    app = create_app(engine, "m")

    async def scenario():
        answers = []
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://m") as client:
                for path, body in requests:
                    response = await client.post(path, json=body, timeout=60)
                    assert response.status_code == 200, response.text
                    if not body.get("stream"):
                        answers.append(response.json())
                        continue
                    lines = [line.removeprefix("data: ") for line in response.text.splitlines() if line]
                    assert lines[-1] == "[DONE]"
                    answers.append([json.loads(line) for line in lines[:-1]])
        return answers

    return asyncio.run(scenario())


def engine_logprobs(engine, ids: list, max_new_tokens: int, top: int) -> list:
    """The engine's own TokenLogprobs of a greedy completion of ``ids`` that ignores EOS."""
    request = engine.request(ids, max_new_tokens, SamplingParams(logprobs=top))
    request.stop_ids = frozenset()
    return [lp for e in run(engine, [request])[request] for lp in e.logprobs]


def random_text(gen, length=12) -> str:
    return "".join(chr(c) for c in torch.randint(97, 123, (length,), generator=gen).tolist())


def test_echo_with_max_tokens_0_scores_the_prompt_as_lm_eval_asks(engine, gen):
    prompt = random_text(gen)
    ids = engine.tokenizer.encode(prompt)
    scoring = {"echo": True, "logprobs": 1, "temperature": 0}
    answer, by_ids, echoed = post_all(engine, [
        ("/v1/completions", {"prompt": prompt, "max_tokens": 0, **scoring}),
        # the same prompt as token ids (a list of one list, as lm-evaluation-harness sends them), max_tokens 1
        ("/v1/completions", {"prompt": [ids], "max_tokens": 1, **scoring}),
        ("/v1/completions", {"prompt": prompt, "echo": True, "max_tokens": 0})])  # echo alone: text, no logprobs
    expected = reference(copy.deepcopy(engine.model), ids)
    choice = answer["choices"][0]
    logprobs = choice["logprobs"]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert answer["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    assert logprobs["tokens"] == [engine.tokenizer.decode([i]) for i in ids]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    for q in range(1, len(ids)):
        assert abs(logprobs["token_logprobs"][q] - expected[q - 1, ids[q]]) < TOL
        top = logprobs["top_logprobs"][q]
        assert logprobs["tokens"][q] in top and 1 <= len(top) <= 2
        assert abs(max(top.values()) - expected[q - 1].max()) < TOL
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    by_ids = by_ids["choices"][0]
    assert by_ids["logprobs"]["token_logprobs"][:len(ids)] == pytest.approx(logprobs["token_logprobs"], abs=TOL)
    assert len(by_ids["logprobs"]["tokens"]) == len(ids) + 1 and by_ids["text"].startswith(prompt)
    assert echoed["choices"][0]["text"] == prompt and echoed["choices"][0]["logprobs"] is None


def test_completion_logprobs_whole_and_streamed(engine, gen):
    prompt = random_text(gen)
    body = {"prompt": prompt, "max_tokens": 6, "logprobs": 3, "temperature": 0, "ignore_eos": True}
    whole, chunks = post_all(engine, [("/v1/completions", body), ("/v1/completions", {**body, "stream": True})])
    logprobs = whole["choices"][0]["logprobs"]
    own = engine_logprobs(engine, engine.tokenizer.encode(prompt), 6, 3)
    assert logprobs["tokens"] == [engine.tokenizer.decode([lp.token_id]) for lp in own]
    assert logprobs["token_logprobs"] == pytest.approx([lp.logprob for lp in own], abs=TOL)
    assert logprobs["text_offset"] == list(itertools.accumulate((len(t) for t in logprobs["tokens"][:-1]), initial=0))
    for top, found in zip(logprobs["top_logprobs"], own):
        assert max(top.values()) == pytest.approx(found.logprob, abs=TOL)  # greedy: the token is the most likely
        assert set(top) == {engine.tokenizer.decode([t]) for t, _ in found.top} | {engine.tokenizer.decode(
            [found.token_id])}
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    assert [t for lp in streamed for t in lp["tokens"]] == logprobs["tokens"]
    assert [v for lp in streamed for v in lp["token_logprobs"]] == pytest.approx(logprobs["token_logprobs"], abs=TOL)
    assert [o for lp in streamed for o in lp["text_offset"]] == logprobs["text_offset"]


def test_chat_logprobs_and_top_logprobs_whole_and_streamed(engine, gen):
    messages = [{"role": "user", "content": random_text(gen)}]
    body = {"messages": messages, "max_tokens": 5, "logprobs": True, "top_logprobs": 2, "temperature": 0,
            "ignore_eos": True}
    whole, chunks, plain = post_all(engine, [("/v1/chat/completions", body),
                                             ("/v1/chat/completions", {**body, "stream": True}),
                                             ("/v1/chat/completions", {"messages": messages, "max_tokens": 2})])
    content = whole["choices"][0]["logprobs"]["content"]
    own = engine_logprobs(engine, chat_prompt_ids(engine.tokenizer, messages), 5, 2)
    assert len(content) == len(own) == 5
    for entry, found in zip(content, own):
        token = engine.tokenizer.decode([found.token_id])
        assert entry["token"] == token and entry["bytes"] == list(token.encode())
        assert entry["logprob"] == pytest.approx(found.logprob, abs=TOL)
        # tokens exactly, logprobs within TOL (pytest >= 9.2's approx takes no nested pairs)
        assert [e["token"] for e in entry["top_logprobs"]] == [engine.tokenizer.decode([t]) for t, _ in found.top]
        assert [e["logprob"] for e in entry["top_logprobs"]] == pytest.approx([v for _, v in found.top], abs=TOL)
    streamed = [e for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                for e in c["choices"][0]["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in content], abs=TOL)
    assert plain["choices"][0]["logprobs"] is None
