"""The OpenAI-compatible server as its clients see it: real `fp6llm serve` processes on 127.0.0.1 with the tiny
random model, driven by the official openai client and by httpx; plus the pieces that need no server (stop strings,
chat templates, the missing-extra message).

Two servers per module, started together: ``main`` (no key, 32 slots) and ``strict`` (an API key, one slot and no
queue, so that a second request finds it full). Prompts are fresh random text each run (the ``gen`` fixture).
"""

import asyncio
import http.client
import json
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

for module in ("fastapi", "uvicorn", "prometheus_client", "openai", "httpx"):
    pytest.importorskip(module)

import httpx  # noqa: E402
import openai  # noqa: E402

from fp6llm.cli import main  # noqa: E402
from fp6llm.server.app import chat_prompt_ids  # noqa: E402
from fp6llm.server.scheduler import StopStrings  # noqa: E402

MODEL = "random:tiny-llama"
KEY = "sk-test-7d3f0a"
STARTUP_S = 60
SHUTDOWN_S = 15
LONG_TOKENS = 480  # about 2 s alone on 2 CPU cores: a request still running while the test does something else


def start_server(log_path, *args) -> subprocess.Popen:
    """`python -m fp6llm serve --random tiny-llama --port 0 ARGS` with its output in log_path."""
    log = open(log_path, "wb")
    process = subprocess.Popen([sys.executable, "-m", "fp6llm", "serve", "--random", "tiny-llama", "--port", "0",
                                "--device", "cpu", *args], stdout=log, stderr=subprocess.STDOUT)
    process.log_path = log_path
    return process


def wait_ready(process) -> str:
    """The server's base URL, once it answers /health (the port is the one uvicorn reports binding)."""
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        text = process.log_path.read_text(errors="replace")
        if process.poll() is not None:
            pytest.fail(f"the server exited with status {process.returncode}:\n{text}")
        found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", text)
        if found:
            try:
                if httpx.get(f"{found[1]}/health", timeout=2).status_code == 200:
                    return found[1]
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    pytest.fail(f"the server did not answer within {STARTUP_S} s:\n{process.log_path.read_text()}")


def stop_server(process, sig=signal.SIGINT) -> int:
    """Send ``sig`` and wait for the exit (killed, and the test failed, after SHUTDOWN_S)."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            return process.wait(SHUTDOWN_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail(f"the server did not stop within {SHUTDOWN_S} s of {sig.name}")
    return process.returncode


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    processes = {"main": start_server(tmp / "main.log", "--max-model-len", "256"),
                 "strict": start_server(tmp / "strict.log", "--api-key", KEY, "--max-batch", "1", "--max-queue", "0")}
    try:
        urls = {name: wait_ready(process) for name, process in processes.items()}
        yield SimpleNamespace(**{name: SimpleNamespace(url=urls[name], process=processes[name]) for name in urls})
    finally:
        for process in processes.values():
            stop_server(process)


@pytest.fixture
def server(servers):
    return servers.main


def random_text(gen, lowest=4, highest=24) -> str:
    length = int(torch.randint(lowest, highest, (), generator=gen))
    return "".join(chr(c) for c in torch.randint(32, 127, (length,), generator=gen).tolist())


def complete(url, prompt, headers=None, **fields) -> dict:
    body = {"model": MODEL, "prompt": prompt, "temperature": 0, **fields}
    response = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def metric(url, name) -> float:
    """The value of one sample line of /metrics (0 when absent)."""
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


# ---- the openai client ----------------------------------------------------------------------------------------------

def test_openai_client_completion_chat_and_streams(server, gen):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    prompt = random_text(gen)
    completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
    choice = completion.choices[0]
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage.prompt_tokens == len(prompt.encode()) + 1  # bytes + BOS
    assert completion.usage.completion_tokens == 10 or choice.finish_reason == "stop"
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": random_text(gen)}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens <= 12

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == chat.choices[0].finish_reason
    assert chunks[-1].usage.model_dump() == chat.usage.model_dump()

    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == choice.text


def test_seeded_sampling_repeats_and_stop_strings_cut_the_text(server, gen):
    prompt = random_text(gen)
    sampled = [complete(server.url, prompt, max_tokens=16, temperature=0.9, top_p=0.95, seed=11)["choices"][0]["text"]
               for _ in range(2)]
    assert sampled[0] == sampled[1]
    forced = complete(server.url, prompt, max_tokens=40, ignore_eos=True)
    assert forced["usage"]["completion_tokens"] == 40 and forced["choices"][0]["finish_reason"] == "length"
    for _ in range(20):  # a prompt whose greedy continuation is long enough to hold a stop string in its middle
        full = complete(server.url, prompt, max_tokens=24)["choices"][0]["text"]
        if len(full) >= 8:
            break
        prompt = random_text(gen)
    stop = full[4:6]
    expected = full[:full.index(stop)]
    answer = complete(server.url, prompt, max_tokens=24, stop=[stop, "\x00never"])
    assert answer["choices"][0]["text"] == expected and answer["choices"][0]["finish_reason"] == "stop"
    with httpx.stream("POST", f"{server.url}/v1/completions", json={
            "prompt": prompt, "max_tokens": 24, "temperature": 0, "stop": stop, "stream": True}) as response:
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event)["choices"][0] for event in events[:-1]]
    assert "".join(c["text"] for c in chunks) == expected and chunks[-1]["finish_reason"] == "stop"


def test_n_choices_each_equal_the_request_with_its_seed(server, gen):
    prompt, seed = random_text(gen), int(torch.randint(-2**62, 2**62, (), generator=gen))
    sampling = dict(max_tokens=8, temperature=0.9, ignore_eos=True)
    alone = [complete(server.url, prompt, seed=seed + i, **sampling)["choices"][0]["text"] for i in range(3)]
    together = complete(server.url, prompt, seed=seed, n=3, **sampling)
    assert [(c["index"], c["text"]) for c in together["choices"]] == list(enumerate(alone))
    assert together["usage"]["prompt_tokens"] == len(prompt) + 1 and together["usage"]["completion_tokens"] == 24
    with httpx.stream("POST", f"{server.url}/v1/completions", json={
            "prompt": prompt, "seed": seed, "n": 3, "stream": True, "stream_options": {"include_usage": True},
            **sampling}) as response:
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[-1]["usage"] == together["usage"]
    streamed = ["".join(c["choices"][0]["text"] for c in chunks[:-1] if c["choices"][0]["index"] == i)
                for i in range(3)]
    assert streamed == alone
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], n=2,
                                          max_tokens=4, temperature=0)
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy: the same twice


def test_continuous_usage_stats_stream_a_chunk_per_token(server, gen):
    body = {"prompt": random_text(gen), "max_tokens": 20, "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"continuous_usage_stats": True, "include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    chunks = [json.loads(event) for event in events[:-1]]
    assert [c["usage"]["completion_tokens"] for c in chunks[:-2]] == list(range(1, 21))  # then finish, usage
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-1]["choices"] == []
    plain = complete(server.url, body["prompt"], max_tokens=20, ignore_eos=True)["choices"][0]["text"]
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == plain


# ---- batching -------------------------------------------------------------------------------------------------------

def test_32_concurrent_streams_each_equal_the_prompt_alone(server, gen):
    prompts = [f"{i}: {random_text(gen)}" for i in range(32)]
    alone = [complete(server.url, p, max_tokens=12)["choices"][0]["text"] for p in prompts]
    steps_before = metric(server.url, "fp6llm_decode_batch_size_count")
    rows_before = metric(server.url, "fp6llm_decode_batch_size_sum")

    async def stream(client, prompt):
        chunks = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                                 stream=True)
        return "".join([chunk.choices[0].text async for chunk in chunks])

    async def all_at_once():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                                      timeout=30) as client:
            return await asyncio.wait_for(asyncio.gather(*[stream(client, p) for p in prompts]), 60)

    together = asyncio.run(all_at_once())
    assert together == alone
    assert any(alone)
    steps = metric(server.url, "fp6llm_decode_batch_size_count") - steps_before
    rows = metric(server.url, "fp6llm_decode_batch_size_sum") - rows_before
    assert rows / steps > 2, "the concurrent requests were not decoded together"


def test_full_server_answers_503_and_a_closed_stream_frees_its_slot(servers, gen):
    strict = servers.strict
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": random_text(gen), "max_tokens": LONG_TOKENS, "ignore_eos": True, "stream": True}
    generated_before = metric(strict.url, "fp6llm_generation_tokens_total")
    with httpx.Client(timeout=30) as client, \
            client.stream("POST", f"{strict.url}/v1/completions", json=body, headers=headers) as running:
        lines = running.iter_lines()
        assert next(lines).startswith("data: ")  # the request holds the only slot
        full = httpx.post(f"{strict.url}/v1/completions", json={"prompt": "x"}, headers=headers)
        assert full.status_code == 503 and full.json()["error"]["code"] == "queue_full"
        assert full.headers["retry-after"] == "1"
    # the client went away: its slot is free long before its LONG_TOKENS would have been generated
    deadline = time.monotonic() + 10
    while metric(strict.url, "fp6llm_running_requests") and time.monotonic() < deadline:
        time.sleep(0.02)
    complete(strict.url, "x", headers=headers, max_tokens=2)
    generated = metric(strict.url, "fp6llm_generation_tokens_total") - generated_before
    assert generated < LONG_TOKENS
    assert metric(strict.url, 'fp6llm_requests_total{endpoint="/v1/completions",status="499"}') >= 1


# ---- errors ---------------------------------------------------------------------------------------------------------

BAD_REQUESTS = {  # id: (path, body: dict or raw bytes, status, param)
    "malformed-json": ("/v1/completions", b'{"prompt": "a", ', 400, None),
    "not-an-object": ("/v1/completions", b'["a"]', 400, None),
    "prompt-wrong-type": ("/v1/completions", {"prompt": 3}, 400, "prompt"),
    "max-tokens-string": ("/v1/completions", {"prompt": "a", "max_tokens": "16"}, 400, "max_tokens"),
    "temperature-string": ("/v1/completions", {"prompt": "a", "temperature": "hot"}, 400, "temperature"),
    "stream-string": ("/v1/completions", {"prompt": "a", "stream": "yes"}, 400, "stream"),
    "max-tokens-negative": ("/v1/completions", {"prompt": "a", "max_tokens": -5}, 400, "max_tokens"),
    "max-tokens-zero": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "max_tokens": 0},
                        400, "max_tokens"),
    "max-tokens-huge": ("/v1/completions", {"prompt": "a", "max_tokens": 10**12}, 400, "max_tokens"),
    "prompt-beyond-context": ("/v1/completions", {"prompt": "a" * 300, "max_tokens": 1}, 400, "prompt"),
    "token-id-beyond-vocab": ("/v1/completions", {"prompt": [1, 70000]}, 400, "prompt"),
    "negative-temperature": ("/v1/completions", {"prompt": "a", "temperature": -1}, 400, "temperature"),
    "top-p-zero": ("/v1/completions", {"prompt": "a", "top_p": 0}, 400, "top_p"),
    "n-0": ("/v1/completions", {"prompt": "a", "n": 0}, 400, "n"),
    "n-beyond-the-batch": ("/v1/completions", {"prompt": "a", "n": 33}, 400, "n"),
    "best-of-2": ("/v1/completions", {"prompt": "a", "best_of": 2}, 400, "best_of"),
    "logprobs-beyond-20": ("/v1/completions", {"prompt": "a", "logprobs": 21}, 400, "logprobs"),
    "max-tokens-0-without-echo": ("/v1/completions", {"prompt": "a", "max_tokens": 0, "logprobs": 1}, 400,
                                  "max_tokens"),
    "chat-top-logprobs-without-logprobs": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                                                    "top_logprobs": 2}, 400, "top_logprobs"),
    "chat-top-logprobs-beyond-20": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                                             "logprobs": True, "top_logprobs": 21}, 400,
                                    "top_logprobs"),
    "presence-penalty": ("/v1/completions", {"prompt": "a", "presence_penalty": 0.5}, 400, "presence_penalty"),
    "repetition-penalty": ("/v1/completions", {"prompt": "a", "repetition_penalty": 1.2}, 400, "repetition_penalty"),
    "min-p": ("/v1/completions", {"prompt": "a", "min_p": 0.1}, 400, "min_p"),
    "json-mode": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                           "response_format": {"type": "json_object"}}, 400, "response_format"),
    "stop-wrong-type": ("/v1/completions", {"prompt": "a", "stop": 5}, 400, "stop"),
    "messages-empty": ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    "messages-string": ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
    "unknown-role": ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "a"}]}, 400, "messages"),
    "unknown-model": ("/v1/completions", {"prompt": "a", "model": "gpt-4o"}, 404, "model"),
    "oversized-body": ("/v1/completions", b'{"prompt": "' + b"a" * (5 * 2**20) + b'"}', 413, None),
    "unknown-path": ("/v1/embeddings", {"input": "a"}, 404, None),
    "lone-surrogate-prompt": ("/v1/completions", b'{"prompt": "a\\ud800b"}', 400, "prompt"),
    "lone-surrogate-chat": ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400,
                            "messages"),
    "lone-surrogate-stop": ("/v1/completions", b'{"prompt": "a", "stop": ["\\ud800"]}', 400, "stop"),
    "json-nested-50000-deep": ("/v1/completions", b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400, None),
    "json-nested-in-a-field": ("/v1/completions", b'{"prompt": ' + b"[" * 900 + b"]" * 900 + b"}", 400, "prompt"),
    "temperature-infinity": ("/v1/completions", b'{"prompt": "a", "temperature": Infinity}', 400, None),
    "temperature-nan": ("/v1/completions", b'{"prompt": "a", "temperature": NaN}', 400, None),
    "temperature-above-2": ("/v1/completions", {"prompt": "a", "temperature": 2.5}, 400, "temperature"),
    "top-p-overflows-to-inf": ("/v1/completions", b'{"prompt": "a", "top_p": 1e999}', 400, "top_p"),
    "prompt-empty-ids": ("/v1/completions", {"prompt": []}, 400, "prompt"),
    "prompt-4m-characters": ("/v1/completions", {"prompt": "a" * 4_000_000}, 400, "prompt"),
}


def post_on_one_connection(url: str, requests: list) -> list:
    """(status, JSON body) of each (path, body bytes) POSTed in turn on one keep-alive HTTP/1.1 connection; fails if
    the server closes it in between."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    answers, sock = [], None
    try:
        for path, body in requests:
            connection.request("POST", path, body, {"Content-Type": "application/json"})
            assert sock is None or connection.sock is sock, "the server closed the keep-alive connection"
            response = connection.getresponse()
            answers.append((response.status, json.loads(response.read())))
            assert not response.will_close, "the server closed the keep-alive connection"
            sock = connection.sock
    finally:
        connection.close()
    return answers


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=str)
def test_bad_requests_get_their_status_and_the_server_goes_on(server, case):
    path, body, status, param = BAD_REQUESTS[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    counter = f'fp6llm_requests_total{{endpoint="{path if path.startswith("/v1/c") else "other"}",status="{status}"}}'
    counted = metric(server.url, counter)
    next_request = json.dumps({"prompt": "next", "max_tokens": 1}).encode()
    (got, answer), (next_status, next_answer) = post_on_one_connection(
        server.url, [(path, content), ("/v1/completions", next_request)])
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert metric(server.url, counter) == counted + 1
    assert next_status == 200 and next_answer["usage"]["prompt_tokens"] == 5


def test_max_tokens_null_means_the_default_and_long_texts_are_refused_before_tokenizing(server, gen):
    answer = complete(server.url, random_text(gen), max_tokens=None, ignore_eos=True)  # what openai sends for None
    assert answer["usage"]["completion_tokens"] == 16
    chat = httpx.post(f"{server.url}/v1/chat/completions", json={
        "messages": [{"role": "user", "content": random_text(gen)}], "max_tokens": None, "max_completion_tokens": None,
        "temperature": 0}, timeout=30)
    assert chat.status_code == 200, chat.text
    for path, body, param in [("/v1/completions", {"prompt": "a" * 4_000_000}, "prompt"),
                              ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * 3_000_000}]},
                               "messages")]:
        response = httpx.post(server.url + path, json=body, timeout=30)
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == param and re.search(r"has \d+ characters: more than 256 tokens", error["message"])


def test_api_key_is_required_on_the_api_only(servers):
    strict = servers.strict
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": KEY}):
        response = httpx.post(f"{strict.url}/v1/completions", json={"prompt": "a"}, headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{strict.url}/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{strict.url}/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=f"{strict.url}/v1", api_key=KEY, max_retries=0)
    assert client.completions.create(model=MODEL, prompt="a", max_tokens=2).usage.prompt_tokens == 2
    assert httpx.get(f"{strict.url}/health").status_code == 200
    assert httpx.get(f"{strict.url}/metrics").status_code == 200
    assert httpx.get(f"{strict.url}/openapi.json").status_code == 401
    spec = httpx.get(f"{strict.url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"})
    assert spec.status_code == 200 and "/v1/completions" in spec.json()["paths"]
    assert httpx.get(f"{strict.url}/docs").status_code == 404


def test_without_a_key_the_openapi_schema_is_open(server):
    assert "/v1/chat/completions" in httpx.get(f"{server.url}/openapi.json").json()["paths"]


# ---- observability, shutdown ----------------------------------------------------------------------------------------

def test_metrics_and_request_log(server):
    answer = complete(server.url, "metrics", max_tokens=3)
    response = httpx.get(f"{server.url}/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in ('fp6llm_requests_total{endpoint="/v1/completions",status="200"}', "fp6llm_prompt_tokens_total",
                 "fp6llm_generation_tokens_total", "fp6llm_queue_depth", "fp6llm_running_requests",
                 "fp6llm_batch_occupancy", "fp6llm_batch_slots 32.0", "fp6llm_decode_batch_size_bucket",
                 "fp6llm_time_to_first_token_seconds_count"):
        assert name in text
    log = server.process.log_path.read_text(errors="replace")
    line = re.search(rf"{answer['id']}: (\d+) prompt tokens, (\d+) generated in [\d.]+ s \([\d.]+ tok/s\), time "
                     rf"to first token [\d.]+ ms, finish (stop|length)", log)
    usage = answer["usage"]
    assert line and (int(line[1]), int(line[2])) == (usage["prompt_tokens"], usage["completion_tokens"])


def test_sigterm_lets_a_running_stream_finish_and_exits(tmp_path, gen):
    # a grace period long enough for the 200 tokens on a busy CPU (test_server_lifecycle.py: one that runs out)
    process = start_server(tmp_path / "server.log", "--max-batch", "2", "--shutdown-grace", "60")
    try:
        url = wait_ready(process)
        body = {"prompt": random_text(gen), "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
    finally:
        stop_server(process, signal.SIGTERM)
    log = (tmp_path / "server.log").read_text()
    assert "Application shutdown complete" in log and "Traceback" not in log


# ---- without a server -----------------------------------------------------------------------------------------------

def test_stop_strings_hold_back_what_may_start_one():
    stops = StopStrings(["END", "\n\n"])
    shown = [stops.feed(piece) for piece in ["Hello E", "N", "ough. Then\n", "x E", "ND and more"]]
    assert shown == [("Hello ", False), ("", False), ("ENough. Then", False), ("\nx ", False), ("", True)]
    assert StopStrings([]).feed("anything") == ("anything", False)
    tail = StopStrings(["abc"])
    assert tail.feed("xab") == ("x", False) and tail.flush() == "ab"


def test_chat_prompt_uses_the_tokenizer_template_or_plain_lines():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    from fp6llm.engine import ByteTokenizer
    from fp6llm.engine.tokenizer import HFTokenizer

    words = ["<unk>", "<|user|>", "<|assistant|>", "hi", "there"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                              additional_special_tokens=["<|user|>", "<|assistant|>"])
    messages = [{"role": "user", "content": "hi there"}]
    plain = HFTokenizer(hf, [])
    assert chat_prompt_ids(plain, messages) == plain.encode("user: hi there\nassistant:")  # no template (yet)
    hf.chat_template = ("{% for m in messages %}<|{{ m.role }}|> {{ m.content }} {% endfor %}"
                        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert chat_prompt_ids(HFTokenizer(hf, []), messages) == [1, 3, 4, 2]
    byte = ByteTokenizer(512)
    assert chat_prompt_ids(byte, messages) == byte.encode("user: hi there\nassistant:")


def test_import_fp6llm_never_imports_fastapi_and_serve_without_it_says_what_to_install(monkeypatch, capsys):
    code = ("import sys, fp6llm, fp6llm.cli; fp6llm.cli.build_parser(); "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'prometheus_client') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout == "[]\n"
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--random", "tiny-llama"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'fp6llm[serve]'" in err and "fastapi" in err
