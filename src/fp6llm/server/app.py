"""The OpenAI-compatible HTTP API over one Engine: ``create_app(engine, model_name, ...)`` -> a FastAPI app.

    POST /v1/completions, /v1/chat/completions   (stream: true -> server-sent events ending with "data: [DONE]")
    GET  /v1/models, /health, /metrics (Prometheus text)

Handlers parse and check a request (a bad one is a 400 in OpenAI's error shape before it reaches the engine),
submit it to the Scheduler's engine thread, and turn the text it sends back into OpenAI's JSON. A client that goes
away cancels its request, which frees its slot. With ``api_key`` set, /v1/* needs "Authorization: Bearer <key>";
/health and /metrics stay open (a load balancer and Prometheus probe them).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Mapping
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from ..engine import Engine, SamplingParams
from .metrics import Metrics
from .protocol import (ApiError, AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                       ChatCompletionRequest, ChatCompletionResponse, ChatDelta, CompletionChoice, CompletionRequest,
                       CompletionResponse, ModelCard, ModelList, Usage)
from .scheduler import Job, QueueFull, Scheduler, ShuttingDown

MAX_BODY_BYTES = 4 * 2**20  # a 128k-token prompt is about 0.5 MB of JSON
QUEUE_PER_SLOT = 4  # default bound of waiting requests: 4 x max_batch
SSE_DONE = "data: [DONE]\n\n"
API_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models")
CLIENT_GONE = 499  # nginx's status for a request whose client closed the connection (metrics only)


def create_app(engine: Engine, model_name: str, api_key: Optional[str] = None, max_queue: Optional[int] = None,
               max_body_bytes: int = MAX_BODY_BYTES, created: int = 0) -> FastAPI:
    """An app serving ``engine`` as model ``model_name``; its lifespan starts and stops the engine thread.

    max_queue: requests that may wait for a slot beyond the engine's max_batch_size ones that run (default
    4 x max_batch_size); more get 503. created: the model's creation time for /v1/models (Unix seconds).
    """
    metrics = Metrics(engine.max_batch_size)
    scheduler = Scheduler(engine, QUEUE_PER_SLOT * engine.max_batch_size if max_queue is None else max_queue, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="fp6llm", summary="OpenAI-compatible API for FPx-quantized LLMs", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.scheduler, app.state.metrics = scheduler, metrics

    def count(request: Request, status: int) -> None:
        endpoint = request.url.path if request.url.path in API_PATHS else "other"
        metrics.requests.labels(endpoint, str(status)).inc()

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

    def check_model(name: Optional[str]) -> None:
        if name is not None and name != model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = scheduler.alive
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

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
        check_model(body.model)
        ids = completion_prompt_ids(engine, body.prompt)
        return await generate(request, body, ids, body.max_tokens, CompletionFormat(model_name))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        body = await read_json(request, ChatCompletionRequest, max_body_bytes)
        check_model(body.model)
        ids = chat_prompt_ids(engine.tokenizer, [{"role": m.role, "content": m.text()} for m in body.messages])
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, engine.max_seq_len - len(ids))
        return await generate(request, body, ids, max_tokens, ChatFormat(model_name))

    async def generate(request: Request, body, prompt_ids: list, max_tokens: int, fmt: "CompletionFormat"):
        unsupported = body.unsupported()
        if unsupported:
            raise ApiError(400, unsupported[1], param=unsupported[0])
        stops = body.stop_strings()
        try:
            sampling = SamplingParams(body.temperature, body.top_k, body.top_p, body.seed)
            engine_request = engine.request(prompt_ids, max_tokens, sampling)
            if body.ignore_eos:
                engine_request.stop_ids = frozenset()
        except ValueError as err:
            param = "max_tokens" if len(prompt_ids) < engine.max_seq_len else fmt.prompt_field
            raise ApiError(400, str(err).replace("max_new_tokens", "max_tokens"), param=param) from None
        options = body.stream_options
        every_token = bool(body.stream and options and options.continuous_usage_stats)
        try:
            job = scheduler.submit(engine_request, stops, fmt.id_prefix, every_token)
        except QueueFull as err:
            raise ApiError(503, str(err), type="server_error", code="queue_full", headers={"Retry-After": "1"})
        except ShuttingDown as err:
            raise ApiError(503, str(err), type="server_error", code="shutting_down")
        fmt.id = job.id
        watcher = asyncio.create_task(cancel_on_disconnect(request, scheduler, job))
        if body.stream:
            events = stream_events(job, fmt, bool(options and options.include_usage), every_token, scheduler, watcher,
                                   lambda status: count(request, status))
            return StreamingResponse(events,
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            text, reason = await collect(job)
        finally:
            watcher.cancel()
        if reason == "abort":
            raise job_error(job, watcher)
        count(request, 200)
        return JSONResponse(fmt.response(text, reason, Usage.of(job.prompt_tokens, job.completion_tokens))
                            .model_dump())

    return app


# ---- parsing --------------------------------------------------------------------------------------------------------

async def read_json(request: Request, model: type, limit: int) -> BaseModel:
    """The body as ``model``: 413 beyond ``limit`` bytes (read no further), 400 for bad JSON or a bad field."""
    length = request.headers.get("content-length", "")
    too_large = ApiError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        data = json.loads(body)
    except ValueError as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"] if not str(part).startswith(("str", "list[")))
        got = json.dumps(first.get("input"))[:80] if first["type"] != "missing" else "nothing"
        raise ApiError(400, f"{field or 'body'}: {first['msg']} (got {got})", param=str(first["loc"][0])) from None


def completion_prompt_ids(engine: Engine, prompt) -> list:
    """Token ids of a completion's prompt: text, a list of one text, or token ids (each below the vocabulary size)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise ApiError(400, f"prompt is a list of {len(prompt)} texts; send one per request", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return engine.tokenizer.encode(prompt)
    vocab = engine.vocab_size
    bad = [i for i in prompt if not 0 <= i < vocab]
    if bad:
        raise ApiError(400, f"prompt has token id {bad[0]}, outside the vocabulary 0..{vocab - 1}", param="prompt")
    return prompt


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


# ---- answering ------------------------------------------------------------------------------------------------------

class CompletionFormat:
    """A job's text as /v1/completions objects: chunks of a stream, or the whole response."""

    id_prefix, prompt_field = "cmpl", "prompt"

    def __init__(self, model: str):
        self.model, self.id, self.created = model, "", int(time.time())

    def _make(self, **fields):
        return CompletionResponse(id=self.id, model=self.model, created=self.created, **fields)

    def first_chunks(self) -> list:
        return []

    def chunk(self, text: str, finish_reason: Optional[str] = None, usage: Optional[Usage] = None) -> BaseModel:
        return self._make(choices=[CompletionChoice(text=text, finish_reason=finish_reason)], usage=usage)

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return self._make(choices=[], usage=usage)

    def response(self, text: str, finish_reason: str, usage: Usage) -> BaseModel:
        return self._make(choices=[CompletionChoice(text=text, finish_reason=finish_reason)], usage=usage)


class ChatFormat(CompletionFormat):
    """The same for /v1/chat/completions: a first chunk with the role, deltas of content, an empty last delta."""

    id_prefix, prompt_field = "chatcmpl", "messages"

    def _make(self, **fields):
        return ChatCompletionChunk(id=self.id, model=self.model, created=self.created, **fields)

    def first_chunks(self) -> list:
        return [self._make(choices=[ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])]

    def chunk(self, text: str, finish_reason: Optional[str] = None, usage: Optional[Usage] = None) -> BaseModel:
        delta = ChatDelta(content=text) if finish_reason is None else ChatDelta()
        return self._make(choices=[ChatChunkChoice(delta=delta, finish_reason=finish_reason)], usage=usage)

    def response(self, text: str, finish_reason: str, usage: Usage) -> BaseModel:
        return ChatCompletionResponse(id=self.id, model=self.model, created=self.created, usage=usage, choices=[
            ChatChoice(message=AssistantMessage(content=text), finish_reason=finish_reason)])


async def cancel_on_disconnect(request: Request, scheduler: Scheduler, job: Job) -> None:
    """Cancel the job when the client closes the connection (the body is read: only http.disconnect comes)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            scheduler.cancel(job)
            return


async def collect(job: Job) -> tuple:
    """(whole text, finish reason) of a job."""
    parts = []
    while True:
        text, reason, _ = await job.outputs.get()
        parts.append(text)
        if reason is not None:
            return "".join(parts), reason


def job_error(job: Job, watcher: asyncio.Task) -> ApiError:
    """The error of an aborted job: the client left (499, for the metrics), shutdown (503), engine failure (500)."""
    if watcher.done() and not watcher.cancelled():
        return ApiError(CLIENT_GONE, "the client closed the connection", code="client_closed_request")
    if job.error == "the server is shutting down":
        return ApiError(503, job.error, type="server_error", code="shutting_down")
    return ApiError(500, job.error or "the request was aborted", type="server_error")


async def stream_events(job: Job, fmt: CompletionFormat, include_usage: bool, every_token: bool,
                        scheduler: Scheduler, watcher: asyncio.Task, count):
    """Server-sent events of a job: chunks as the text comes (every_token: a chunk per token, with the usage so
    far), the usage chunk if asked for, then [DONE]."""
    status = CLIENT_GONE
    try:
        for chunk in fmt.first_chunks():
            yield sse(chunk)
        while True:
            text, reason, tokens = await job.outputs.get()
            usage = Usage.of(job.prompt_tokens, tokens) if every_token else None
            if reason == "abort":
                error = job_error(job, watcher)
                status = error.status
                if status != CLIENT_GONE:
                    yield f"data: {json.dumps(error.body())}\n\n"
                break
            if text or (every_token and reason is None):
                yield sse(fmt.chunk(text, usage=usage))
            if reason is not None:
                yield sse(fmt.chunk("", reason, usage))
                if include_usage:
                    yield sse(fmt.usage_chunk(Usage.of(job.prompt_tokens, job.completion_tokens)))
                status = 200
                break
        yield SSE_DONE
    finally:  # also when the stream is closed early (the client left) or cancelled (shutdown)
        watcher.cancel()
        if job.finish_reason is None:
            status = CLIENT_GONE
            scheduler.cancel(job)
        count(status)


def sse(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"
