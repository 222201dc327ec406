"""The server under load and at its ends: admission and gauges that follow cancellations at once, tokenizing off the
event loop, a catch-all 500 in OpenAI's shape, clients that vanish mid-body, and the drain on SIGTERM (in-process
apps over httpx's ASGI transport, and real `fp6llm serve` processes as in test_server.py)."""

import asyncio
import json
import signal
import socket
import threading
import time

import pytest

for module in ("fastapi", "uvicorn", "prometheus_client", "httpx"):
    pytest.importorskip(module)

import httpx  # noqa: E402

from fp6llm.engine import load  # noqa: E402
from fp6llm.server.app import create_app  # noqa: E402
from fp6llm.server.scheduler import QueueFull, ShuttingDown  # noqa: E402
from test_server import LONG_TOKENS, metric, random_text, start_server, stop_server, wait_ready  # noqa: E402

SLOW_ENCODE_S = 1.0


@pytest.fixture(scope="module")
def engine():
    return load("random:tiny-llama", device="cpu", max_batch_size=1, max_seq_len=64, progress=False)


def gauge(app, name: str) -> float:
    line = next(line for line in app.state.metrics.render()[0].decode().splitlines() if line.startswith(name + " "))
    return float(line.split()[-1])


def test_a_cancelled_job_frees_its_place_and_the_gauges_at_once(engine):
    app = create_app(engine, "m", max_queue=1)  # the engine thread is not started: nothing but the counts moves
    scheduler = app.state.scheduler

    async def scenario():
        first, second = (scheduler.submit(engine.request([1, 2, 3], 4)) for _ in range(2))
        with pytest.raises(QueueFull):
            scheduler.submit(engine.request([1], 4))
        assert scheduler.load == (2, 0) and gauge(app, "fp6llm_queue_depth") == 2
        scheduler.cancel(first)
        scheduler.cancel(first)  # twice (the disconnect watcher and the stream's end both do): counted once
        assert scheduler.load == (1, 0) and gauge(app, "fp6llm_queue_depth") == 1
        scheduler.submit(engine.request([1], 4))  # the cancelled job's place, before the engine thread drops it
        scheduler.close()
        with pytest.raises(ShuttingDown):
            scheduler.submit(engine.request([1], 4))
        assert not scheduler.alive and second.finish_reason is None

    asyncio.run(scenario())


def asgi_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fp6llm.test")


def test_tokenizing_runs_off_the_event_loop(engine, monkeypatch):
    app = create_app(engine, "m")

    def slow_encode(text):
        time.sleep(SLOW_ENCODE_S)
        return [1] * 1000  # then too long for the 64 positions

    monkeypatch.setattr(engine.tokenizer, "encode", slow_encode)

    async def scenario():
        async with asgi_client(app) as client:
            start = time.perf_counter()
            completion = asyncio.create_task(client.post("/v1/completions", json={"prompt": "slow"}))
            await asyncio.sleep(0.1)  # the completion is tokenizing now
            health = await client.get("/health")  # 503: the engine thread is not started, but it answers
            waited = time.perf_counter() - start  # a blocked event loop: SLOW_ENCODE_S at least
            assert health.status_code in (200, 503) and waited < SLOW_ENCODE_S / 2, waited
            response = await completion
            assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"

    asyncio.run(scenario())


def test_an_unexpected_error_is_a_counted_500_in_openai_shape(engine, monkeypatch):
    app = create_app(engine, "m")

    def broken_encode(text):
        raise RuntimeError("a bug")

    monkeypatch.setattr(engine.tokenizer, "encode", broken_encode)

    async def scenario():
        async with asgi_client(app) as client:
            return await client.post("/v1/completions", json={"prompt": "x"})

    response = asyncio.run(scenario())
    assert response.status_code == 500
    assert response.json()["error"] == {"message": "internal error: RuntimeError", "type": "server_error",
                                        "param": None, "code": None}
    assert gauge(app, 'fp6llm_requests_total{endpoint="/v1/completions",status="500"}') == 1


# ---- real servers ---------------------------------------------------------------------------------------------------

def gone_mid_body(url: str) -> None:
    """Send headers announcing 1000 bytes of body, a few of them, and close the connection."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: fp6llm\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"prompt\": \"")


def sse_lines(response) -> list:
    return [line.removeprefix("data: ") for line in response.iter_lines() if line]


def test_clients_gone_mid_body_are_counted_without_a_traceback_and_sigterm_drains(tmp_path, gen):
    process = start_server(tmp_path / "server.log", "--max-batch", "1", "--max-queue", "2", "--shutdown-grace", "0.5")
    try:
        url = wait_ready(process)
        gone = 'fp6llm_requests_total{endpoint="/v1/completions",status="499"}'
        for _ in range(5):
            gone_mid_body(url)
        deadline = time.monotonic() + 10
        while metric(url, gone) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(url, gone) == 5

        long_body = {"prompt": random_text(gen), "max_tokens": LONG_TOKENS, "ignore_eos": True, "stream": True}
        queued_answer = {}
        queued = threading.Thread(target=lambda: queued_answer.update(response=httpx.post(
            f"{url}/v1/completions", json={"prompt": "queued", "max_tokens": 4}, timeout=30)))
        with httpx.Client(timeout=30) as client, \
                client.stream("POST", f"{url}/v1/completions", json=long_body) as running, \
                client.stream("POST", f"{url}/v1/completions", json={**long_body, "max_tokens": 4}) as waiting:
            lines = running.iter_lines()
            assert next(lines).startswith("data: ")  # the long request holds the only slot
            queued.start()
            deadline = time.monotonic() + 10
            while metric(url, "fp6llm_queue_depth") < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            process.send_signal(signal.SIGTERM)
            rest = [line.removeprefix("data: ") for line in lines if line]
            waited = sse_lines(waiting)
        queued.join(30)
    finally:
        stop_server(process, signal.SIGTERM)
    # the running stream is ended after the grace period: an error event, then [DONE]
    assert rest[-1] == "[DONE]" and json.loads(rest[-2])["error"]["code"] == "shutting_down"
    assert len(rest) < LONG_TOKENS
    # the queued ones: a stream gets the error and [DONE], a plain request the designed 503
    assert waited[-1] == "[DONE]" and json.loads(waited[-2])["error"]["code"] == "shutting_down"
    response = queued_answer["response"]
    assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down"
    log = (tmp_path / "server.log").read_text()
    assert "Application shutdown complete" in log and "Traceback" not in log
