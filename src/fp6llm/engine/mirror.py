"""One Engine over tensor-parallel ranks: rank 0 decides, every other rank repeats (``fp6llm serve --tp N``).

Every rank holds its slice of the model and an Engine of its own, and a forward pass needs all of them at once (its
all-reduces). The server runs on rank 0 only; it drives a ``MirroredEngine``, which sends each call that changes
the engine (add, step, abort, warm_up) to the other ranks before making it. They run ``follow``: receive the call,
make it on their Engine, wait for the next. Every rank then runs the same forwards in the same order (the batcher
decides from the calls alone, over the same number of blocks), and since the logits are the same on every rank
(models/parallel.py replicates lm_head) so are the sampled tokens: a request without a seed gets one from rank 0
before it is sent.

The calls travel over a gloo group of their own (engine/distributed.py's ``control_group``) with a long timeout: an
idle server keeps its followers waiting in a CPU receive, not in an NCCL collective that would time out.

    with process_group(n, device) as (tp, device):
        engine = load(..., tp=tp)
        group = control_group()
        if tp.rank == 0:
            mirrored = MirroredEngine(engine, group)
            ...serve mirrored...
            mirrored.stop()        # releases the followers
        else:
            follow(engine, group)
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
from typing import Sequence

from .distributed import broadcast_object
from .generate import Engine, Request

log = logging.getLogger(__name__)


class MirroredEngine:
    """Rank 0's Engine; add / step / abort / warm_up are first sent to the ranks that ``follow``. Everything else
    (counts, tokenizer, request(), stats, ...) is the wrapped Engine's. One thread at a time makes calls (the
    server's engine thread); ``stop`` may come from another and waits for a call in progress."""

    def __init__(self, engine: Engine, group=None):
        self._engine, self._group = engine, group
        self._ids: dict = {}  # Request -> the number the followers know it by, while it runs
        self._next_id = 0
        self._lock = threading.Lock()
        self._stopped = False

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def _send(self, message: tuple) -> None:
        if self._stopped:
            raise RuntimeError("the tensor-parallel ranks were released (MirroredEngine.stop)")
        broadcast_object(message, self._group)

    def _forget_finished(self) -> None:
        for request in [r for r in self._ids if r.finished]:
            del self._ids[request]

    def add(self, requests: Sequence[Request]) -> list:
        with self._lock:
            sent = []
            for request in requests:
                if request.sampling.seed is None and not request.sampling.greedy:  # one seed for every rank
                    request.sampling = dataclasses.replace(request.sampling,
                                                           seed=random.SystemRandom().randrange(2**63))
                self._ids[request] = self._next_id
                sent.append((self._next_id, request.prompt_ids, request.max_new_tokens, request.sampling,
                             request.stop_ids, request.stop_strings))
                self._next_id += 1
            self._send(("add", sent))
            try:
                return self._engine.add(requests)
            except BaseException:  # refused (too long) or failed: none of them runs
                for request in requests:
                    self._ids.pop(request, None)
                raise
            finally:
                self._forget_finished()

    def step(self) -> list:
        with self._lock:
            self._send(("step",))
            try:
                return self._engine.step()
            finally:
                self._forget_finished()

    def warm_up(self) -> None:
        with self._lock:
            self._send(("warm_up",))
            self._engine.warm_up()

    def abort(self, request: Request) -> None:
        with self._lock:
            number = self._ids.pop(request, None)
            if number is not None and not self._stopped:
                self._send(("abort", number))
            self._engine.abort(request)

    def stop(self) -> None:
        """Release the followers (their ``follow`` returns); later calls raise RuntimeError. Idempotent."""
        with self._lock:
            if not self._stopped:
                self._send(("stop",))
                self._stopped = True


def follow(engine: Engine, group=None) -> None:
    """Make rank 0's engine calls on this rank's ``engine`` until rank 0 says stop.

    A call that fails here failed on rank 0 too (the same check of the same request), so it is logged and the next
    one is awaited.
    """
    running: dict = {}  # the number rank 0 gave a request -> this rank's Request
    while True:
        message = broadcast_object(None, group)
        kind = message[0]
        if kind == "stop":
            return
        try:
            if kind == "add":
                requests = [Request(list(ids), max_new, sampling, stop_ids, stop_strings)
                            for _, ids, max_new, sampling, stop_ids, stop_strings in message[1]]
                running.update(zip((number for number, *_ in message[1]), requests))
                engine.add(requests)
            elif kind == "step":
                engine.step()
            elif kind == "warm_up":
                engine.warm_up()
            elif kind == "abort":
                request = running.pop(message[1], None)
                if request is not None:
                    engine.abort(request)
            else:
                raise ValueError(f"unknown engine call {kind!r} from rank 0")
        except Exception:
            log.exception("engine call %r failed on this rank", kind)
        finally:
            for number in [n for n, r in running.items() if r.finished]:
                del running[number]
