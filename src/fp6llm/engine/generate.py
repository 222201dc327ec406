"""The generation loop: slots of a static KV cache, prefill, one decode step for every active slot, CUDA graphs.

An ``Engine`` owns a model (with its caches), a tokenizer and ``max_batch_size`` slots, each a row of the KV cache.
The step-level API is what a server with continuous batching drives::

    engine.add([request, ...])   # free slots take the requests; their rows are prefilled; first tokens sampled
    engine.step()                # one decode step of every active slot; finished requests free their slots
    engine.abort(request)        # free a slot early

and ``generate`` / ``stream`` are a small scheduler on top: they fill free slots with waiting prompts, step, and
refill as requests finish, so any number of prompts runs through a cache of ``max_batch_size`` rows.

As in gpt-fast, speed comes from a static cache and a captured decode step, not from plumbing: on CUDA the decode
forward of the active rows (rounded up to a power of two) is captured once as a CUDA graph over static token and
position buffers and replayed every step; sampling runs eagerly after it. Elsewhere, or with cuda_graph=False,
everything runs eagerly.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from ..models.attention import KVCache
from .sampling import SamplingParams, sample
from .tokenizer import TextStream

DEFAULT_MAX_SEQ_LEN = 2048  # the cache's positions when none are asked for (and the model allows that many)
PREFILL_TOKENS_PER_FORWARD = 16384  # prompts are prefilled in groups of rows of about this many tokens


@dataclass(eq=False)  # a request is itself, not its fields: usable in sets and as a dict key
class Request:
    """One prompt's generation. The engine fills in slot, generator, output_ids and finish_reason.

    finish_reason: None while running; "stop" (a stop id was sampled; it is not in output_ids), "length"
    (max_new_tokens reached) or "abort".
    """

    prompt_ids: list
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset = frozenset()
    output_ids: list = field(default_factory=list)
    finish_reason: Optional[str] = None
    slot: Optional[int] = None
    generator: Optional[torch.Generator] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def last_position(self) -> int:
        """Cache position of the newest token (the next decode step's input)."""
        return len(self.prompt_ids) + len(self.output_ids) - 1


@dataclass
class Delta:
    """What one request gained in one step: new token ids, their text, and whether it has finished."""

    index: int
    token_ids: list
    text: str
    finish_reason: Optional[str] = None


@dataclass
class Stats:
    """Seconds and tokens of the prefills and decode steps since the last reset (device-synchronized)."""

    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    step_seconds: list = field(default_factory=list)
    decode_tokens: int = 0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        total = sum(self.step_seconds)
        return self.decode_tokens / total if total else 0.0

    @property
    def ms_per_step(self) -> float:
        """Median milliseconds of one decode step."""
        return 1e3 * statistics.median(self.step_seconds) if self.step_seconds else 0.0

    def summary(self) -> str:
        return (f"prefill {self.prefill_tokens} tokens at {self.prefill_tokens_per_s:.1f} tok/s, decode "
                f"{self.decode_tokens} tokens at {self.decode_tokens_per_s:.1f} tok/s, {self.ms_per_step:.2f} ms/step "
                f"(median of {len(self.step_seconds)})")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_length(prompt_tokens: int, max_new_tokens: int, cache_positions: int, model_positions: int,
                 what: str = "the prompt") -> None:
    """ValueError naming the numbers unless prompt_tokens (>= 1) + max_new_tokens (>= 1) <= cache_positions."""
    if prompt_tokens < 1:
        raise ValueError(f"{what} is empty: it needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt_tokens + max_new_tokens > cache_positions:
        limit = (f"the model's max_position_embeddings {model_positions}" if cache_positions == model_positions else
                 f"the KV cache's {cache_positions} positions (max_seq_len; the model allows up to {model_positions})")
        raise ValueError(f"{what} has {prompt_tokens} tokens + max_new_tokens {max_new_tokens} = "
                         f"{prompt_tokens + max_new_tokens}, more than {limit}")


class DecodeGraph:
    """The decode forward of rows 0..rows-1 captured as a CUDA graph over static token/position buffers."""

    def __init__(self, model: nn.Module, tokens: torch.Tensor, positions: torch.Tensor, pool):
        self.tokens, self.positions = tokens, positions  # views of the engine's static buffers
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside capture: Triton compiles, scratch buffers allocate
            for _ in range(2):
                model(tokens, positions)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = model(tokens, positions)

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits


class Engine:
    """A model, its tokenizer and a KV cache of ``max_batch_size`` slots x ``max_seq_len`` positions.

    model: a decoder of fp6llm.models (``setup_caches``, ``forward(tokens, input_pos, logits_at)``, ``config``).
    tokenizer: encode / decode / eos_token_ids (engine.tokenizer); None will do for requests of token ids.
    max_seq_len defaults to min(max_position_embeddings, 2048). cuda_graph: capture decode steps on CUDA (False:
    eager everywhere). compile: run decode steps through torch.compile (fuses the norms, rotary embedding,
    activations and residual adds around the fpx_linear custom op; one compilation per batch-row count). One Engine per model at a time: a new one replaces the model's caches.
    Raises ValueError for a max_seq_len beyond the model's max_position_embeddings or a batch size < 1.
    """

    def __init__(self, model: nn.Module, tokenizer, max_batch_size: int = 8, max_seq_len: Optional[int] = None,
                 cuda_graph: bool = True, compile: bool = False):
        limit = model.config.max_position_embeddings
        max_seq_len = max_seq_len or min(limit, DEFAULT_MAX_SEQ_LEN)
        if not 1 <= max_seq_len <= limit:
            raise ValueError(f"max_seq_len {max_seq_len} must be in 1..{limit} (the model's max_position_embeddings)")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        weight = next(p for p in model.parameters() if p.is_floating_point())
        self.model, self.tokenizer = model.eval(), tokenizer
        # Generation stops on the tokenizer's EOS and on the model config's (LLaMA 3 has two).
        tokenizer_eos = getattr(tokenizer, "eos_token_ids", ())
        self.stop_ids = frozenset(tokenizer_eos) | frozenset(model.config.eos_token_ids)
        self.device, self.dtype = weight.device, weight.dtype
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        model.setup_caches(max_batch_size, max_seq_len, self.dtype, self.device)
        self.slots: list = [None] * max_batch_size
        # Static decode inputs (a CUDA graph reads them in place): rows of free slots decode token 0 at position 0,
        # junk that their next prefill overwrites.
        self.tokens = torch.zeros(max_batch_size, 1, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(max_batch_size, 1, dtype=torch.long, device=self.device)
        self.use_cuda_graph = cuda_graph and self.device.type == "cuda"
        self.decode_model = torch.compile(model, fullgraph=True, dynamic=False) if compile else model
        self._graphs: dict = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.use_cuda_graph else None
        self.stats = Stats()

    # ---- the step-level API -------------------------------------------------------------------------------------

    @property
    def active(self) -> list:
        return [r for r in self.slots if r is not None]

    @property
    def free_slots(self) -> int:
        return self.slots.count(None)

    def check_length(self, prompt_tokens: int, max_new_tokens: int, what: str = "the prompt") -> None:
        """ValueError (with the numbers) unless a prompt of this many tokens plus max_new_tokens fits the cache."""
        check_length(prompt_tokens, max_new_tokens, self.max_seq_len, self.model.config.max_position_embeddings, what)

    def request(self, prompt: Union[str, Sequence[int]], max_new_tokens: int,
                sampling: SamplingParams = SamplingParams(), what: str = "the prompt") -> Request:
        """A Request for a prompt (text, or token ids), checked against the cache; stops on ``stop_ids``."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        self.check_length(len(ids), max_new_tokens, what)
        return Request(ids, max_new_tokens, sampling, self.stop_ids)

    @torch.inference_mode()
    def add(self, requests: Sequence[Request]) -> list:
        """Put requests in free slots, prefill their rows and sample each one's first token.

        Returns [(request, token or None)] (None: it stopped at once). Raises ValueError when fewer slots are free
        than requests, or a request does not fit the cache.
        """
        if len(requests) > self.free_slots:
            raise ValueError(f"{len(requests)} requests but only {self.free_slots} of {self.max_batch_size} slots "
                             f"are free")
        for request in requests:
            self.check_length(len(request.prompt_ids), request.max_new_tokens)
        free = [i for i, r in enumerate(self.slots) if r is None]
        for slot, request in zip(free, requests):
            request.slot, self.slots[slot] = slot, request
            request.generator = request.sampling.make_generator(self.device)
        synchronize(self.device)
        start = time.perf_counter()
        events = []
        try:
            for group in self._prefill_groups(sorted(requests, key=lambda r: r.slot)):
                events += self._prefill(group)
        except BaseException:  # out of memory, interrupted: the slots are not left half-filled
            for request in requests:
                self.abort(request)
            raise
        synchronize(self.device)
        self.stats.prefill_seconds += time.perf_counter() - start
        self.stats.prefill_tokens += sum(len(r.prompt_ids) for r in requests)
        return events

    @torch.inference_mode()
    def step(self) -> list:
        """One decode step of every active slot: [(request, token or None)]; finished requests leave their slots."""
        active = self.active
        if not active:
            return []
        synchronize(self.device)
        start = time.perf_counter()
        logits = self._decode(active)[:, -1]
        slots = [r.slot for r in active]
        events = self._accept(active, sample(logits[slots], [r.sampling for r in active],
                                             [r.generator for r in active]))
        self.stats.step_seconds.append(time.perf_counter() - start)  # _accept's tolist() synchronized
        self.stats.decode_tokens += len(active)
        return events

    def close(self) -> None:
        """Free the KV cache and the CUDA graphs (the model stays usable: a new Engine sets up new caches)."""
        for request in self.active:
            self.abort(request)
        self._graphs.clear()
        drop_caches(self.model)

    def abort(self, request: Request) -> None:
        """Stop a running request and free its slot."""
        if request.slot is not None and self.slots[request.slot] is request:
            self.slots[request.slot] = None
        request.slot = None
        request.finish_reason = request.finish_reason or "abort"

    # ---- generation on top of the steps ------------------------------------------------------------------------

    def stream(self, prompts: Union[str, Sequence[str]], max_new_tokens: int = 128, temperature: float = 0.0,
               top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None
               ) -> Iterator[Delta]:
        """Deltas of every prompt's completion, as they come (index = the prompt's position in ``prompts``).

        Prompt i samples with seed + i (its tokens do not depend on the other prompts). Every prompt is checked
        against the cache before anything runs (ValueError naming the prompt and the numbers).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        pending = [self.request(prompt, max_new_tokens,
                                SamplingParams(temperature, top_k, top_p, None if seed is None else seed + i),
                                f"prompt {i}" if len(prompts) > 1 else "the prompt")
                   for i, prompt in enumerate(prompts)]
        return self._run(pending)

    def _run(self, pending: list) -> Iterator[Delta]:
        """Schedule the requests through the slots (refilling them as requests finish), yielding their Deltas.

        Other requests in the slots (a server's) are stepped along but not reported.
        """
        index = {r: i for i, r in enumerate(pending)}
        texts = {r: TextStream(self.tokenizer, r.prompt_ids) for r in pending}
        running: list = []
        pending.reverse()
        try:
            while pending or running:
                batch = [pending.pop() for _ in range(min(self.free_slots, len(pending)))]
                running += batch
                events = (self.add(batch) if batch else []) + self.step()
                for request, token in events:
                    if request not in index:
                        continue
                    new = [] if token is None else [token]
                    text = texts[request].push(new)
                    if request.finished:
                        text += texts[request].flush()
                        running.remove(request)
                    yield Delta(index[request], new, text, request.finish_reason)
        finally:  # a consumer that stops early leaves no request of its own behind in the slots
            for request in running:
                self.abort(request)

    def generate(self, prompts: Union[str, Sequence[str]], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
                 stream: Union[bool, Callable[[Delta], None]] = False) -> list:
        """Completions (list[str], one per prompt, prompt text not included) of a prompt or a list of prompts.

        temperature 0 is greedy. stream: a callable gets every Delta as it comes; True prints the deltas of a single
        prompt to stdout. Resets and fills ``self.stats``.
        """
        callback = _print_delta if stream is True else stream or None
        self.stats = Stats()
        count = 1 if isinstance(prompts, str) else len(prompts)
        ids: list = [[] for _ in range(count)]
        for delta in self.stream(prompts, max_new_tokens, temperature, top_k, top_p, seed):
            ids[delta.index] += delta.token_ids
            if callback is not None:
                callback(delta)
        return [self.tokenizer.decode(row) for row in ids]

    # ---- internals ----------------------------------------------------------------------------------------------

    def _prefill_groups(self, requests: list) -> Iterator[list]:
        """Runs of requests in consecutive slots, at most about PREFILL_TOKENS_PER_FORWARD padded tokens each."""
        group: list = []
        for request in requests:
            longest = max([len(r.prompt_ids) for r in group + [request]])
            if group and (request.slot != group[-1].slot + 1 or
                          longest * (len(group) + 1) > PREFILL_TOKENS_PER_FORWARD):
                yield group
                group = []
            group.append(request)
        if group:
            yield group

    def _prefill(self, group: list) -> list:
        """Prefill requests in slots first..first+len-1: right-padded prompts, logits of each last prompt token."""
        length = max(len(r.prompt_ids) for r in group)
        tokens = torch.zeros(len(group), length, dtype=torch.long)
        for row, r in enumerate(group):
            tokens[row, :len(r.prompt_ids)] = torch.tensor(r.prompt_ids)
        positions = torch.arange(length).expand(len(group), -1)
        last = torch.tensor([[len(r.prompt_ids) - 1] for r in group])
        with cache_rows(self.model, group[0].slot, group[0].slot + len(group)):
            logits = self.model(tokens.to(self.device), positions.to(self.device), logits_at=last.to(self.device))
        return self._accept(group, sample(logits[:, -1], [r.sampling for r in group], [r.generator for r in group]))

    def _decode(self, active: list) -> torch.Tensor:
        """Logits [rows, 1, vocab] of one decode step of cache rows 0..rows-1, which hold every active slot.

        rows is the highest active slot + 1, rounded up to a power of two for a CUDA graph (one graph per size).
        """
        rows = max(r.slot for r in active) + 1
        if self.use_cuda_graph:
            rows = min(1 << (rows - 1).bit_length(), self.max_batch_size)
        tokens, positions = [0] * rows, [0] * rows
        for r in active:
            tokens[r.slot], positions[r.slot] = r.output_ids[-1], r.last_position
        self.tokens[:rows, 0].copy_(torch.tensor(tokens))  # one host-to-device copy each, not one per row
        self.positions[:rows, 0].copy_(torch.tensor(positions))
        if self.use_cuda_graph and rows not in self._graphs:
            try:
                self._graphs[rows] = DecodeGraph(self.decode_model, self.tokens[:rows], self.positions[:rows],
                                                 self._graph_pool)
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError as err:  # an op that cannot be captured: slower, still right
                warnings.warn(f"capturing the decode step as a CUDA graph failed, decoding eagerly: {err}")
                self.use_cuda_graph = False
        if not self.use_cuda_graph:
            return self.decode_model(self.tokens[:rows], self.positions[:rows])
        return self._graphs[rows]()

    def _accept(self, requests: list, tokens: torch.Tensor) -> list:
        """Append each request's new token, or finish it (stop id, max_new_tokens); free finished slots."""
        events = []
        for request, token in zip(requests, tokens.tolist()):
            if token in request.stop_ids:
                request.finish_reason, token = "stop", None
            else:
                request.output_ids.append(token)
                if len(request.output_ids) >= request.max_new_tokens:
                    request.finish_reason = "length"
            if request.finished:
                self.slots[request.slot] = None
            events.append((request, token))
        return events


@contextlib.contextmanager
def cache_rows(model: nn.Module, start: int, stop: int):
    """Point every KVCache of ``model`` at its rows start..stop-1 (views: writes land in the full cache).

    The decoders write and read cache rows 0..B-1 for a batch of B rows; this lets a batch of B rows use the slots
    start..start+B-1 instead (prefilling new requests while other slots hold running ones).
    """
    caches = [m for m in model.modules() if isinstance(m, KVCache)]
    full = [(c.k_cache, c.v_cache) for c in caches]
    if start != 0:
        for cache, (k, v) in zip(caches, full):
            cache.k_cache, cache.v_cache = k[start:stop], v[start:stop]
    try:
        yield
    finally:
        for cache, (k, v) in zip(caches, full):
            cache.k_cache, cache.v_cache = k, v


def drop_caches(model: nn.Module) -> None:
    """Remove every KVCache from ``model`` (their memory is freed once nothing else holds them)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, KVCache):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, None)


def _print_delta(delta: Delta) -> None:
    print(delta.text, end="\n" if delta.finish_reason else "", flush=True)
