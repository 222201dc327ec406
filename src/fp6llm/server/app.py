"""The OpenAI-compatible HTTP API over one Engine: ``create_app(engine, model_name, ...)`` -> a FastAPI app.

    POST /v1/completions, /v1/chat/completions   (stream: true -> server-sent events ending with "data: [DONE]")
    GET  /v1/models, /health, /metrics (Prometheus text), /openapi.json

Handlers parse and check a request (a bad one is a 4xx in OpenAI's error shape before it reaches the engine, and an
unexpected failure a 500 in the same shape; every one is counted in the metrics and keeps the connection), tokenize
it off the event loop (a text too long for the context is refused before that), submit it to the Scheduler's engine
thread, and turn the text it sends back into OpenAI's JSON. A client that goes away cancels its request, which frees
its slot. With ``api_key`` set, /v1/* and /openapi.json need "Authorization: Bearer <key>"; /health and /metrics
stay open (a load balancer and Prometheus probe them).

Shutdown (``app.state.drain_soon()``, safe to call from a signal handler): no more requests are admitted (503, and
the queued ones too), the running ones get ``shutdown_grace_s`` to finish, then each ends with an error (a stream:
an error event and [DONE]).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Mapping
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..engine import Engine, SamplingParams
from .answers import (CLIENT_GONE, ChatFormat, CompletionFormat, cancel_on_disconnect, collect, job_error,
                      stream_events, total_usage)
from .metrics import Metrics
from .protocol import (COMPLETION_MAX_TOKENS, SEED_RANGE, ApiError, ChatCompletionRequest, CompletionRequest,
                       ModelCard, ModelList)
from .scheduler import QueueFull, Scheduler, ShuttingDown

MAX_BODY_BYTES = 4 * 2**20  # a 128k-token prompt is about 0.5 MB of JSON
QUEUE_PER_SLOT = 4  # default bound of waiting requests: 4 x max_batch
API_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models")
SHUTDOWN_GRACE_S = 5.0  # on shutdown, running requests get this long to finish before they are ended
DRAIN_POLL_S = 0.05

log = logging.getLogger("fp6llm.server")


def create_app(engine: Engine, model_name: str, api_key: Optional[str] = None, max_queue: Optional[int] = None,
               max_body_bytes: int = MAX_BODY_BYTES, created: int = 0,
               shutdown_grace_s: float = SHUTDOWN_GRACE_S) -> FastAPI:
    """An app serving ``engine`` as model ``model_name``; its lifespan starts and stops the engine thread.

    max_queue: requests that may wait for a slot beyond the engine's max_batch_size ones that run (default
    4 x max_batch_size); more get 503. created: the model's creation time for /v1/models (Unix seconds).
    shutdown_grace_s: how long running requests may go on after ``app.state.drain_soon()``.
    """
    if shutdown_grace_s < 0:
        raise ValueError(f"shutdown_grace_s must be >= 0, got {shutdown_grace_s}")
    metrics = Metrics(engine.max_batch_size)
    scheduler = Scheduler(engine, QUEUE_PER_SLOT * engine.max_batch_size if max_queue is None else max_queue, metrics)
    metrics.follow(lambda: scheduler.load)  # the gauges read the scheduler's counts when scraped
    draining: list = []  # the drain task, once started

    async def drain() -> None:
        scheduler.close()  # new and queued requests: 503
        deadline = time.monotonic() + shutdown_grace_s
        while sum(scheduler.load) and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        running = sum(scheduler.load)
        if running:
            log.warning("shutdown: ending %d request(s) still running after %.1f s", running, shutdown_grace_s)
        await asyncio.to_thread(scheduler.stop)  # what still runs ends with an error (streams: event + [DONE])

    def start_drain() -> None:
        if not draining:
            draining.append(asyncio.ensure_future(drain()))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        app.state.drain_soon = lambda: loop.call_soon_threadsafe(start_drain)
        scheduler.start()
        yield
        start_drain()
        await draining[0]

    app = FastAPI(title="fp6llm", summary="OpenAI-compatible API for FPx-quantized LLMs", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.metrics = scheduler, metrics
    app.state.drain_soon = lambda: None  # until the lifespan has started (and has an event loop)

    def count(request: Request, status: int) -> None:
        endpoint = request.url.path if request.url.path in API_PATHS else "other"
        metrics.requests.labels(endpoint, str(status)).inc()

    app.add_middleware(CatchAll, count=count)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        count(request, err.status)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(HTTPException)  # unknown paths, wrong methods: the same error shape
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return await api_error(request, ApiError(err.status_code, str(err.detail), headers=err.headers))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")

    def check_body(body) -> None:
        """What can be refused before the prompt is tokenized: another model, a field the engine cannot honour."""
        if body.model is not None and body.model != model_name:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        unsupported = body.unsupported()
        if unsupported:
            raise ApiError(400, unsupported[1], param=unsupported[0])
        if body.n > engine.max_batch_size:
            raise ApiError(400, f"n={body.n} is more than the {engine.max_batch_size} requests this server decodes "
                                f"together (--max-batch)", param="n")

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = scheduler.alive
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> dict:
        authorize(request)
        return app.openapi()

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        count(request, 200)
        card = ModelCard(id=model_name, created=created, max_model_len=engine.max_seq_len)
        return ModelList(data=[card]).model_dump()

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        body = await read_json(request, CompletionRequest, max_body_bytes)
        check_body(body)
        ids = await completion_prompt_ids(engine, body.prompt)
        max_tokens = COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        echo = await echo_text(engine, body.prompt, ids) if body.echo else None
        # with echo, the engine computes the prompt's logprobs when they are asked for, and when max_tokens 0 makes
        # the prompt the whole answer (a request for nothing else would be refused)
        scoring = body.echo and (body.logprobs is not None or max_tokens == 0)
        answer = CompletionFormat(model_name, engine.tokenizer, body.logprobs is not None, echo)
        return await generate(request, body, ids, max_tokens, answer, body.logprobs,
                              (body.logprobs or 0) if scoring else None)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        body = await read_json(request, ChatCompletionRequest, max_body_bytes)
        check_body(body)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        check_text_length(engine, sum(len(m["content"]) for m in messages), "messages")
        ids = await asyncio.to_thread(chat_prompt_ids, engine.tokenizer, messages)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, engine.max_seq_len - len(ids))
        answer = ChatFormat(model_name, engine.tokenizer, body.logprobs)
        return await generate(request, body, ids, max_tokens, answer,
                              (body.top_logprobs or 0) if body.logprobs else None)

    async def generate(request: Request, body, prompt_ids: list, max_tokens: int, answer: CompletionFormat,
                       logprobs: Optional[int] = None, prompt_logprobs: Optional[int] = None):
        """Run the request as ``body.n`` jobs (choice i samples with seed + i when a seed is given), asking the
        engine for ``logprobs`` / ``prompt_logprobs`` alternatives (SamplingParams)."""
        stops = body.stop_strings()
        try:
            engine_requests = []
            for i in range(body.n):
                seed = None if body.seed is None else (body.seed + i + SEED_RANGE) % (2 * SEED_RANGE) - SEED_RANGE
                sampling = SamplingParams(body.temperature, body.top_k, body.top_p, seed, logprobs, prompt_logprobs)
                engine_request = engine.request(prompt_ids, max_tokens, sampling)
                if body.ignore_eos:
                    engine_request.stop_ids = frozenset()
                engine_requests.append(engine_request)
        except ValueError as err:
            param = "max_tokens" if 0 < len(prompt_ids) < engine.max_seq_len else answer.prompt_field
            raise ApiError(400, str(err).replace("max_new_tokens", "max_tokens"), param=param) from None
        options = body.stream_options
        every_token = bool(body.stream and options and options.continuous_usage_stats)
        jobs = []
        try:
            for engine_request in engine_requests:
                jobs.append(scheduler.submit(engine_request, stops, answer.id_prefix, every_token))
        except (QueueFull, ShuttingDown) as err:
            for job in jobs:  # all the choices or none
                scheduler.cancel(job)
            if isinstance(err, QueueFull):
                raise ApiError(503, str(err), type="server_error", code="queue_full", headers={"Retry-After": "1"})
            raise ApiError(503, str(err), type="server_error", code="shutting_down")
        answer.id = jobs[0].id
        watcher = asyncio.create_task(cancel_on_disconnect(request, scheduler, jobs))
        if body.stream:
            events = stream_events(jobs, answer, bool(options and options.include_usage), every_token, scheduler,
                                   watcher, lambda status: count(request, status))
            return StreamingResponse(events,
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            results = await asyncio.gather(*(collect(job) for job in jobs))
        finally:
            watcher.cancel()
        aborted = next((job for job, (_, reason, _) in zip(jobs, results) if reason == "abort"), None)
        if aborted is not None:
            raise job_error(aborted, watcher)
        count(request, 200)
        return JSONResponse(answer.response(jobs, results, total_usage(jobs)).model_dump())

    return app


# ---- parsing --------------------------------------------------------------------------------------------------------

async def read_json(request: Request, model: type, limit: int) -> BaseModel:
    """The body as ``model``: 413 beyond ``limit`` bytes (read no further), 400 for bad JSON or a bad field."""
    length = request.headers.get("content-length", "")
    too_large = ApiError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
    except ClientDisconnect:  # nobody reads the answer: it only counts (and logs no traceback)
        raise ApiError(CLIENT_GONE, "the client closed the connection while sending the body",
                       code="client_closed_request") from None
    try:
        data = json.loads(body, parse_constant=_not_json)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    except ValueError as err:  # UnicodeDecodeError too
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"]
                         if not str(part).startswith(("str", "list[", "function-")))
        raise ApiError(400, f"{field or 'body'}: {first['msg']} (got {_shown(first)})",
                       param=str(first["loc"][0])) from None


def _not_json(constant: str):
    raise ValueError(f"{constant} is not a JSON number")


def _shown(error: dict) -> str:
    """The start of a validation error's input, as JSON."""
    if error["type"] == "missing":
        return "nothing"
    try:
        return json.dumps(error.get("input"))[:80]
    except (ValueError, RecursionError):  # a lone surrogate is fine (escaped), a deep nesting is not
        return "a value"


def check_text_length(engine: Engine, chars: int, param: str) -> None:
    """400 for a text that cannot fit the context whatever its tokens, before the time to tokenize it is spent."""
    max_chars = getattr(engine.tokenizer, "max_chars", None)
    if max_chars is not None and chars > max_chars(engine.max_seq_len):
        raise ApiError(400, f"{param} has {chars} characters: more than {engine.max_seq_len} tokens whatever they are, "
                            f"the most the context holds", param=param)


async def completion_prompt_ids(engine: Engine, prompt) -> list:
    """Token ids of a completion's prompt: text (tokenized in a worker thread, not on the event loop), a list of one
    text, token ids (each below the vocabulary size), or a list of one list of token ids."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            kind = "texts" if isinstance(prompt[0], str) else "lists of token ids"
            raise ApiError(400, f"prompt is a list of {len(prompt)} {kind}; send one per request", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        check_text_length(engine, len(prompt), "prompt")
        return await asyncio.to_thread(engine.tokenizer.encode, prompt)
    vocab = engine.vocab_size
    bad = [i for i in prompt if not 0 <= i < vocab]
    if bad:
        raise ApiError(400, f"prompt has token id {bad[0]}, outside the vocabulary 0..{vocab - 1}", param="prompt")
    return prompt


async def echo_text(engine: Engine, prompt, ids: list) -> str:
    """The text that echo puts before a completion: the prompt's own text, or its token ids decoded."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    return prompt if isinstance(prompt, str) else await asyncio.to_thread(engine.tokenizer.decode, ids)


def chat_prompt_ids(tokenizer, messages: list) -> list:
    """Token ids of chat messages ([{"role", "content"}]) through the tokenizer's chat template, with the
    assistant's turn opened; a tokenizer without one (the byte tokenizer of random models) gets
    "role: content" lines and "assistant:"."""
    hf_tokenizer = getattr(tokenizer, "tokenizer", None)
    if getattr(hf_tokenizer, "chat_template", None):
        try:
            ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=False)
        except Exception as err:  # the template's own checks (roles must alternate, ...) raise Jinja errors
            raise ApiError(400, f"the model's chat template refused the messages: {err}", param="messages") from None
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)
    text = "".join(f"{message['role']}: {message['content']}\n" for message in messages)
    return tokenizer.encode(text + "assistant:")


class CatchAll:
    """ASGI middleware: an unexpected exception becomes a 500 in OpenAI's error shape, counted, logged once, and the
    connection is kept (uvicorn closes a connection whose application raised). Inside it, FastAPI's handlers have
    already turned every ApiError into its response."""

    def __init__(self, app, count):
        self.app, self.count = app, count

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception as err:
            if started:  # mid-response: nothing left to answer with
                raise
            log.exception("unexpected error in %s %s", scope.get("method"), scope.get("path"))
            error = ApiError(500, f"internal error: {type(err).__name__}", type="server_error")
            self.count(Request(scope), error.status)
            await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
