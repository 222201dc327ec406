"""The text of a request's jobs (one per choice: ``n`` of them) as OpenAI's JSON: a whole response, or server-sent
events as the text comes; and what an aborted job answers (499 / 503 / 500)."""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import time
from contextlib import aclosing
from typing import AsyncIterator, Optional

from fastapi import Request
from pydantic import BaseModel

from .protocol import (ApiError, AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                       ChatCompletionResponse, ChatDelta, ChatLogprobs, ChatTokenLogprob, ChatTopLogprob,
                       CompletionChoice, CompletionLogprobs, CompletionResponse, Usage)
from .scheduler import AbortReason, Job, Scheduler

SSE_DONE = "data: [DONE]\n\n"
CLIENT_GONE = 499  # nginx's status for a request whose client closed the connection (metrics only)


class CompletionFormat:
    """Jobs' texts as /v1/completions objects: chunks of a stream (each of one choice ``index``), or the whole
    response (a choice per job).

    tokenizer: shows each token's text (needed with logprobs). logprobs: whether the choices carry their tokens'
    logprobs. echo: the prompt's text, which each choice begins with (with logprobs, its tokens' logprobs too).
    Logprob items are (token id, engine TokenLogprob, or None for the prompt's first token).
    """

    id_prefix, prompt_field = "cmpl", "prompt"

    def __init__(self, model: str, tokenizer=None, logprobs: bool = False, echo: Optional[str] = None):
        self.model, self.id, self.created = model, "", int(time.time())
        self.tokenizer, self.logprobs, self.echo = tokenizer, logprobs, echo
        self._offsets = collections.Counter()  # choice index -> where its next token's text starts

    def _make(self, **fields):
        return CompletionResponse(id=self.id, model=self.model, created=self.created, **fields)

    def first_chunks(self, index: int) -> list:
        return []

    def prefix(self, job: Job) -> tuple:
        """(text, logprob items) that a choice begins with: the prompt's with echo, else nothing."""
        if self.echo is None:
            return "", []
        request = job.request
        return self.echo, list(zip(request.prompt_ids, request.prompt_logprobs)) if self.logprobs else []

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def choice_logprobs(self, items: list, index: int) -> Optional[CompletionLogprobs]:
        """The logprobs of choice ``index``'s next tokens (None unless asked for); their text offsets go on from
        the choice's tokens before."""
        if not self.logprobs:
            return None
        texts = [self.token_text(token) for token, _ in items]
        offsets = list(itertools.accumulate(map(len, texts), initial=self._offsets[index]))
        self._offsets[index] = offsets.pop()
        tops = [None if found is None else top_dict(self.token_text, found) for _, found in items]
        return CompletionLogprobs(tokens=texts, token_logprobs=[None if f is None else f.logprob for _, f in items],
                                  top_logprobs=tops, text_offset=offsets)

    def chunk(self, text: str, finish_reason: Optional[str] = None, usage: Optional[Usage] = None,
              index: int = 0, logprobs: list = ()) -> BaseModel:
        choice = CompletionChoice(index=index, text=text, finish_reason=finish_reason,
                                  logprobs=self.choice_logprobs(list(logprobs), index) if logprobs else None)
        return self._make(choices=[choice], usage=usage)

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return self._make(choices=[], usage=usage)

    def response(self, jobs: list, results: list, usage: Usage) -> BaseModel:
        """results: (text, finish reason, logprob items) of each job's choice."""
        choices = []
        for i, (job, (text, reason, items)) in enumerate(zip(jobs, results)):
            echoed, echoed_items = self.prefix(job)
            choices.append(CompletionChoice(index=i, text=echoed + text, finish_reason=reason,
                                            logprobs=self.choice_logprobs(echoed_items + items, i)))
        return self._make(choices=choices, usage=usage)


class ChatFormat(CompletionFormat):
    """The same for /v1/chat/completions: a first chunk with the role, deltas of content, an empty last delta;
    logprobs as chat's ``logprobs.content`` list."""

    id_prefix, prompt_field = "chatcmpl", "messages"

    def _make(self, **fields):
        return ChatCompletionChunk(id=self.id, model=self.model, created=self.created, **fields)

    def first_chunks(self, index: int) -> list:
        return [self._make(choices=[ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))])]

    def _entry(self, token: int, logprob: float, cls=ChatTopLogprob, **fields):
        text = self.token_text(token)
        return cls(token=text, logprob=logprob, bytes=list(text.encode("utf-8")), **fields)

    def choice_logprobs(self, items: list, index: int) -> Optional[ChatLogprobs]:
        if not self.logprobs:
            return None
        return ChatLogprobs(content=[
            self._entry(token, found.logprob, ChatTokenLogprob,
                        top_logprobs=[self._entry(t, value) for t, value in found.top]) for token, found in items])

    def chunk(self, text: str, finish_reason: Optional[str] = None, usage: Optional[Usage] = None,
              index: int = 0, logprobs: list = ()) -> BaseModel:
        delta = ChatDelta(content=text) if finish_reason is None else ChatDelta()
        choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason,
                                 logprobs=self.choice_logprobs(list(logprobs), index) if logprobs else None)
        return self._make(choices=[choice], usage=usage)

    def response(self, jobs: list, results: list, usage: Usage) -> BaseModel:
        return ChatCompletionResponse(id=self.id, model=self.model, created=self.created, usage=usage, choices=[
            ChatChoice(index=i, message=AssistantMessage(content=text), finish_reason=reason,
                       logprobs=self.choice_logprobs(items, i))
            for i, (text, reason, items) in enumerate(results)])


def top_dict(token_text, found) -> dict:
    """{token text: logprob} of the most likely tokens and the token itself, as /v1/completions shows them. Tokens
    whose texts are alike share a key: the most likely keeps it (so a token that was not the argmax never looks like
    it was)."""
    top: dict = {}
    for token, value in (*found.top, (found.token_id, found.logprob)):
        top.setdefault(token_text(token), value)
    return top


def logprob_items(logprobs: list) -> list:
    """(token id, TokenLogprob) of a job output's engine TokenLogprobs."""
    return [(found.token_id, found) for found in logprobs]


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
    """(whole text, finish reason, logprob items) of a job."""
    parts, items = [], []
    while True:
        text, reason, _, logprobs = await job.outputs.get()
        parts.append(text)
        items += logprob_items(logprobs)
        if reason is not None:
            return "".join(parts), reason, items


async def merged_outputs(jobs: list) -> AsyncIterator[tuple]:
    """(index, (text, finish reason, tokens, logprobs)) of the jobs' outputs as they come, each job's in order, until
    every job has given its last."""
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
    """Server-sent events of a request's jobs: chunks as the text comes, each naming its choice and carrying its
    tokens' logprobs when asked for (every_token: a chunk per token, with that choice's usage so far), the usage
    chunk if asked for, then [DONE]. With echo, a choice's first chunk is the prompt. A job that aborts ends the
    stream with an error event (unless the client left) and [DONE]."""
    status = CLIENT_GONE
    started: set = set()
    try:
        for index in range(len(jobs)):
            for chunk in answer.first_chunks(index):
                yield sse(chunk)
        async with aclosing(merged_outputs(jobs)) as outputs:
            async for index, (text, reason, tokens, logprobs) in outputs:
                job = jobs[index]
                usage = Usage.of(job.prompt_tokens, tokens) if every_token else None
                if reason == "abort":
                    error = job_error(job, watcher)
                    status = error.status
                    if status != CLIENT_GONE:
                        yield f"data: {json.dumps(error.body())}\n\n"
                    break
                if index not in started:
                    started.add(index)
                    echoed, echoed_items = answer.prefix(job)
                    if echoed or echoed_items:
                        yield sse(answer.chunk(echoed, index=index, logprobs=echoed_items))
                if text or logprobs or (every_token and reason is None):
                    yield sse(answer.chunk(text, usage=usage, index=index, logprobs=logprob_items(logprobs)))
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
