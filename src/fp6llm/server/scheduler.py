"""The engine thread: the one owner of the Engine (model, KV cache, device), a thin driver of its scheduler.

HTTP handlers run on the asyncio event loop; they ``submit`` a request and read its text from the Job's asyncio
queue. The engine thread hands new requests to the Engine (``Engine.add``), calls ``Engine.step`` while anything
runs, and passes each job the text of its Events (``loop.call_soon_threadsafe``). Admission (free KV-cache blocks),
chunked prefill, preemption, stop ids and stop strings are the Engine's (engine/batcher.py, engine/generate.py):
requests that arrive while others decode join the running batch at the next step, continuous batching.

Cancelling (a client that went away) only marks the job; the engine thread aborts it between steps, since the
Engine is not thread-safe. What stays here: the thread, the bridge to asyncio and the bound on requests in flight.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from ..engine import Engine, Request
from ..engine.tokenizer import StopStrings  # noqa: F401  (re-exported: it lived here)
from .metrics import Metrics

log = logging.getLogger("fp6llm.server")


class QueueFull(Exception):
    """max_batch + max_queue requests are in flight already."""


class ShuttingDown(Exception):
    """The engine loop has stopped, or is closed for new requests (shutdown)."""


class AbortReason(enum.Enum):
    """Why a job ended with "abort"; the value is the error a client is told (an engine failure adds its own)."""

    CANCELLED = "cancelled"
    SHUTDOWN = "the server is shutting down"
    ENGINE_FAILED = "the engine failed"


@dataclass(eq=False)
class Job:
    """One request on its way through the engine loop, seen from both threads.

    ``outputs`` (read on the event loop) receives (text, finish_reason, tokens generated so far, logprobs) for each
    token that adds text, or for every token with ``every_token``; finish_reason is None until the last one: "stop"
    (EOS or a stop string), "length" (max_tokens), or "abort" (cancelled, shut down, or an engine error: then
    ``abort_reason`` says which and ``error`` says it in words). logprobs: the TokenLogprob of each token since the
    last output (with ``request.sampling.logprobs``; empty otherwise).
    """

    id: str
    request: Request
    loop: asyncio.AbstractEventLoop
    every_token: bool = False
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: Optional[float] = None
    finished_at: Optional[float] = None
    finish_reason: Optional[str] = None
    abort_reason: Optional[AbortReason] = None
    error: Optional[str] = None
    logprobs: list = field(default_factory=list)  # of the tokens not handed to the event loop yet

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.request.output_ids)

    @property
    def time_to_first_token(self) -> Optional[float]:
        return None if self.first_token_at is None else self.first_token_at - self.arrived

    def emit(self, text: str, finish_reason: Optional[str] = None) -> None:
        """Hand text, and the logprobs gathered since the last time, to the event loop (from the engine thread)."""
        logprobs, self.logprobs = self.logprobs, []
        try:
            self.loop.call_soon_threadsafe(self.outputs.put_nowait,
                                           (text, finish_reason, self.completion_tokens, logprobs))
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass


class Scheduler:
    """The engine thread and the jobs in flight (at most ``max_batch + max_queue``: running in the Engine, or
    waiting there or here for the thread to hand them over)."""

    def __init__(self, engine: Engine, max_queue: int, metrics: Optional[Metrics] = None):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.engine, self.max_queue, self.metrics = engine, max_queue, metrics
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: collections.deque = collections.deque()  # submitted, not yet handed to the engine
        self._cancelled: list = []
        self._in_flight = 0  # submitted and not finished (waiting + running)
        self._stopping = False
        self._closed = False  # no new jobs; the waiting ones are refused (shutdown), the running ones go on
        self._running: dict = {}  # Request -> Job of the requests in the engine; engine thread only
        self._thread: Optional[threading.Thread] = None

    # ---- event loop side ----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="fp6llm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish every job with "abort" (AbortReason.SHUTDOWN) and end the engine thread."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)  # a step in progress finishes first; a daemon thread never blocks exit

    def submit(self, request: Request, stops: list = (), prefix: str = "cmpl", every_token: bool = False) -> Job:
        """Queue a checked Request (``Engine.request``) for the engine; call on the event loop. stops: stop strings
        (the engine applies them).

        every_token: an output for every token, even one whose text is held back (a partial character, the start of
        a stop string). Raises QueueFull when max_batch + max_queue jobs are in flight, ShuttingDown once stopped.
        """
        stops = tuple(s for s in stops if s)
        if stops:
            request.stop_strings = tuple(request.stop_strings) + stops
        job = Job(f"{prefix}-{secrets.token_hex(12)}", request, asyncio.get_running_loop(), every_token)
        with self._lock:
            if self._stopping or self._closed:
                raise ShuttingDown(AbortReason.SHUTDOWN.value)
            bound = self.engine.max_batch_size + self.max_queue
            if self._in_flight - len(self._cancelled) >= bound:  # a cancelled job's place is free already
                raise QueueFull(f"the server is at capacity ({bound} requests in flight: {self.engine.max_batch_size} "
                                f"in the batch, {self.max_queue} waiting); retry later")
            self._in_flight += 1
            self._waiting.append(job)
            self._wake.notify()
        if self.metrics:
            self.metrics.prompt_tokens.inc(job.prompt_tokens)
        return job

    def cancel(self, job: Job) -> None:
        """Free the job's KV-cache blocks (or its place in the queue) soon; harmless once it has finished."""
        if job.finish_reason is None:
            with self._lock:
                if job not in self._cancelled:
                    self._cancelled.append(job)
                self._wake.notify()

    def close(self) -> None:
        """Stop admitting (shutdown): ``submit`` raises ShuttingDown and the waiting jobs finish with "abort"
        (AbortReason.SHUTDOWN); the running ones go on until they finish or ``stop``."""
        with self._lock:
            self._closed = True
            self._wake.notify()

    @property
    def load(self) -> tuple:
        """(waiting, running) jobs, not counting the cancelled ones that the engine thread has yet to drop."""
        with self._lock:
            cancelled = set(self._cancelled)
            waiting = sum(job not in cancelled for job in self._waiting) + self.engine.num_waiting
            return waiting, self._in_flight - len(cancelled) - waiting

    @property
    def alive(self) -> bool:
        """Whether the engine thread runs (and takes requests)."""
        return self._thread is not None and self._thread.is_alive() and not (self._stopping or self._closed)

    # ---- engine thread ------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stopping or self._waiting or self._cancelled or self._running):
                    self._wake.wait()
                if self._stopping:
                    break
                cancelled, self._cancelled = self._cancelled, []
                for job in cancelled:
                    if job in self._waiting:
                        self._waiting.remove(job)
                refused = list(self._waiting) if self._closed else []
                admitted = [] if self._closed else list(self._waiting)
                self._waiting.clear()
            for job in cancelled:
                self.engine.abort(job.request)
                self._abort(job, AbortReason.CANCELLED)
            if self._closed:  # handed to the engine but not admitted yet (and with no output): refused too
                refused += [self._running[r] for r in self.engine.waiting if r in self._running and not r.output_ids]
            for job in refused:
                self.engine.abort(job.request)
                self._abort(job, AbortReason.SHUTDOWN)
            try:
                if admitted:
                    for job in admitted:
                        self._running[job.request] = job
                    self.engine.add([job.request for job in admitted])
                if self.metrics and self.engine.num_running:
                    self.metrics.decode_batch.observe(self.engine.num_running)
                self._deliver_all(self.engine.step())
            except Exception as err:  # an engine failure fails the requests in the batch, not the server
                log.exception("engine step failed; failing %d requests", len(self._running))
                for job in list(self._running.values()):
                    self.engine.abort(job.request)
                    self._abort(job, AbortReason.ENGINE_FAILED, f"{type(err).__name__}: {err}")
                continue
        with self._lock:
            left = list(self._waiting) + list(self._running.values())
            self._waiting.clear()
        for job in left:
            self.engine.abort(job.request)
            self._abort(job, AbortReason.SHUTDOWN)

    def _deliver_all(self, events: list) -> None:
        for event in events:
            job = self._running.get(event.request)
            if job is not None:
                self._deliver(job, event)

    def _deliver(self, job: Job, event) -> None:
        """An Event's text to the job; a finished job leaves."""
        if job.first_token_at is None:
            job.first_token_at = time.perf_counter()
        job.logprobs += event.logprobs
        if event.finish_reason is not None:
            self._finish(job, event.finish_reason, text=event.text)
        elif event.text or job.every_token:
            job.emit(event.text)

    def _abort(self, job: Job, why: AbortReason, detail: str = "") -> None:
        """Finish the job with "abort" for reason ``why``; its error is why's words (and ``detail``, if any)."""
        if job.finish_reason is None:
            job.abort_reason = why
        self._finish(job, "abort", f"{why.value}: {detail}" if detail else why.value)

    def _finish(self, job: Job, reason: str, error: Optional[str] = None, text: str = "") -> None:
        if job.finish_reason is not None:
            return
        job.finish_reason, job.error, job.finished_at = reason, error, time.perf_counter()
        self._running.pop(job.request, None)
        with self._lock:
            self._in_flight -= 1
        job.emit(text, reason)
        seconds = job.finished_at - job.arrived
        ttft = job.time_to_first_token
        if self.metrics:
            self.metrics.generated_tokens.inc(job.completion_tokens)
            self.metrics.request_seconds.observe(seconds)
            if ttft is not None:
                self.metrics.time_to_first_token.observe(ttft)
        log.info("%s: %d prompt tokens, %d generated in %.3f s (%.1f tok/s), time to first token %s, finish %s%s",
                 job.id, job.prompt_tokens, job.completion_tokens, seconds, job.completion_tokens / seconds,
                 "-" if ttft is None else f"{1e3 * ttft:.1f} ms", reason, f" ({error})" if error else "")


def warm_up(engine: Engine) -> None:
    """Capture the decode step for every batch size before serving (``Engine.warm_up``; nothing on a CPU), so that
    the first requests do not wait while it is captured and its kernels compile."""
    engine.warm_up()
