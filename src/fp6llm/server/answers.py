"""The text of a request's jobs (one per choice: ``n`` of them) as OpenAI's JSON: a whole response, or server-sent
events as the text comes; and what an aborted job answers (499 / 503 / 500)."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import aclosing
from typing import AsyncIterator, Optional

from fastapi import Request
from pydantic import BaseModel

from .protocol import (ApiError, AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                       ChatCompletionResponse, ChatDelta, CompletionChoice, CompletionResponse, Usage)
from .scheduler import AbortReason, Job, Scheduler

SSE_DONE = "data: [DONE]\n\n"
CLIENT_GONE = 499  # nginx's status for a request whose client closed the connection (metrics only)


class CompletionFormat:
    """Jobs' texts as /v1/completions objects: chunks of a stream (each of one choice ``index``), or the whole
    response (a choice per job)."""

    id_prefix, prompt_field = "cmpl", "prompt"

    def __init__(self, model: str):
        self.model, self.id, self.created = model, "", int(time.time())

    def _make(self, **fields):
        return CompletionResponse(id=self.id, model=self.model, created=self.created, **fields)

    def first_chunks(self, index: int) -> list:
        return []

    def chunk(self, text: str, finish_reason: Optional[str] = None, usage: Optional[Usage] = None,
              index: int = 0) -> BaseModel:
        return self._make(choices=[CompletionChoice(index=index, text=text, finish_reason=finish_reason)],
                          usage=usage)

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return self._make(choices=[], usage=usage)

    def response(self, results: list, usage: Usage) -> BaseModel:
        """results: (text, finish reason) of each choice."""
        return self._make(choices=[CompletionChoice(index=i, text=text, finish_reason=reason)
                                   for i, (text, reason) in enumerate(results)], usage=usage)


class ChatFormat(CompletionFormat):
    """The same for /v1/chat/completions: a first chunk with the role, deltas of content, an empty last delta."""

    id_prefix, prompt_field = "chatcmpl", "messages"

    def _make(self, **fields):
        return ChatCompletionChunk(id=self.id, model=self.model, created=self.created, **fields)

    def first_chunks(self, index: int) -> list:
        return [self._make(choices=[ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))])]

    def chunk(self, text: str, finish_reason: Optional[str] = None, usage: Optional[Usage] = None,
              index: int = 0) -> BaseModel:
        delta = ChatDelta(content=text) if finish_reason is None else ChatDelta()
        return self._make(choices=[ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason)],
                          usage=usage)

    def response(self, results: list, usage: Usage) -> BaseModel:
        return ChatCompletionResponse(id=self.id, model=self.model, created=self.created, usage=usage, choices=[
            ChatChoice(index=i, message=AssistantMessage(content=text), finish_reason=reason)
            for i, (text, reason) in enumerate(results)])


def total_usage(jobs: list) -> Usage:
    """The prompt once (as OpenAI counts n > 1), every choice's completion tokens."""
    return Usage.of(jobs[0].prompt_tokens, sum(job.completion_tokens for job in jobs))


async def cancel_on_disconnect(request: Request, scheduler: Scheduler, jobs: list) -> None:
    """Cancel the jobs when the client closes the connection (the body is read: only http.disconnect comes)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            for job in jobs:
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


async def merged_outputs(jobs: list) -> AsyncIterator[tuple]:
    """(index, (text, finish reason, tokens)) of the jobs' outputs as they come, each job's in order, until every
    job has given its last."""
    pending = {asyncio.ensure_future(job.outputs.get()): i for i, job in enumerate(jobs)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.get):
                index = pending.pop(task)
                output = task.result()
                yield index, output
                if output[1] is None:
                    pending[asyncio.ensure_future(jobs[index].outputs.get())] = index
    finally:
        for task in pending:
            task.cancel()


def job_error(job: Job, watcher: asyncio.Task) -> ApiError:
    """The error of an aborted job: the client left (499, for the metrics), shutdown (503), engine failure (500)."""
    if watcher.done() and not watcher.cancelled():
        return ApiError(CLIENT_GONE, "the client closed the connection", code="client_closed_request")
    if job.abort_reason is AbortReason.SHUTDOWN:
        return ApiError(503, job.error, type="server_error", code="shutting_down")
    return ApiError(500, job.error or "the request was aborted", type="server_error")


async def stream_events(jobs: list, answer: CompletionFormat, include_usage: bool, every_token: bool,
                        scheduler: Scheduler, watcher: asyncio.Task, count):
    """Server-sent events of a request's jobs: chunks as the text comes, each naming its choice (every_token: a
    chunk per token, with that choice's usage so far), the usage chunk if asked for, then [DONE]. A job that aborts
    ends the stream with an error event (unless the client left) and [DONE]."""
    status = CLIENT_GONE
    try:
        for index in range(len(jobs)):
            for chunk in answer.first_chunks(index):
                yield sse(chunk)
        async with aclosing(merged_outputs(jobs)) as outputs:
            async for index, (text, reason, tokens) in outputs:
                job = jobs[index]
                usage = Usage.of(job.prompt_tokens, tokens) if every_token else None
                if reason == "abort":
                    error = job_error(job, watcher)
                    status = error.status
                    if status != CLIENT_GONE:
                        yield f"data: {json.dumps(error.body())}\n\n"
                    break
                if text or (every_token and reason is None):
                    yield sse(answer.chunk(text, usage=usage, index=index))
                if reason is not None:
                    yield sse(answer.chunk("", reason, usage, index))
            else:
                if include_usage:
                    yield sse(answer.usage_chunk(total_usage(jobs)))
                status = 200
        yield SSE_DONE
    finally:  # also when the stream is closed early (the client left) or cancelled (shutdown)
        watcher.cancel()
        for job in jobs:
            if job.finish_reason is None:
                scheduler.cancel(job)
        count(status)


def sse(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"
