"""The Engine: a model, its tokenizer and its paged KV cache, driven one step at a time by one scheduler.

The step-level API is what ``generate`` / ``stream`` and the server (server/scheduler.py) all drive::

    engine.add([request, ...])   # queued; admitted when the cache has free blocks for them
    engine.step()                # one forward of prefill chunks and one decode of every running request: [Event]
    engine.abort(request)        # end a request early and free its blocks

Which requests run, and how many of their tokens, is the batcher's (engine/batcher.py): admission by free blocks,
chunked prefill under a token budget per step, preemption of the newest request when blocks run out. The runner
(engine/runner.py) turns a step into forwards, captured as CUDA graphs on CUDA: the decode one (sampling included),
and prefills of up to 512 padded tokens.
This module gives each admitted request's sampler slot its settings, samples after prefill, reads each step's new
token ids to the host once, applies stop ids, max_new_tokens and stop strings there, turns tokens into text, and
reports logprobs to the requests that ask for them (SamplingParams.logprobs / prompt_logprobs).

The cache holds ``num_blocks`` blocks of BLOCK_SIZE positions: by default, on CUDA, what the GPU memory left after
the weights allows under ``gpu_memory_utilization`` (at most enough for max_batch_size sequences of max_seq_len),
elsewhere exactly max_batch_size x max_seq_len positions.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from ..kernels.launch import static_weights
from ..models.attention import BLOCK_SIZE, blocks_for
from .batcher import Batcher, Request
from .blocks import BlockAllocator
from .runner import Runner, drop_caches, synchronize, to_device
from .sampling import DeviceSampler, SamplingParams, token_logprobs
from .tokenizer import CompletionText

DEFAULT_MAX_SEQ_LEN = 2048  # the cache's positions when none are asked for (and the model allows that many)
DEFAULT_STEP_TOKENS = 4096  # tokens per forward (decodes + prefill chunks): prefill runs in chunks of about this
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # of the GPU's memory, weights + KV cache + activations


@dataclass
class Event:
    """What one request gained in one step: its new token ids (none when it stopped), their text (held back while
    it may be the start of a stop string), its finish_reason once it has finished, and with
    ``sampling.logprobs`` a TokenLogprob (engine/sampling.py) per token drawn: the new ids', or the stop id's that
    ended it (not in token_ids; lm-evaluation-harness counts on one logprob per drawn token)."""

    request: Request
    token_ids: list
    text: str
    finish_reason: Optional[str] = None
    logprobs: list = field(default_factory=list)


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


def check_length(prompt_tokens: int, max_new_tokens: int, cache_positions: int, model_positions: int,
                 what: str = "the prompt", scoring: bool = False) -> None:
    """ValueError naming the numbers unless prompt_tokens (>= 1) + max_new_tokens (>= 1; >= 0 when ``scoring``: the
    prompt's logprobs are an answer of their own) <= cache_positions."""
    if prompt_tokens < 1:
        raise ValueError(f"{what} is empty: it needs at least one token")
    if max_new_tokens < (0 if scoring else 1):
        raise ValueError(f"max_new_tokens must be >= {0 if scoring else 1}, got {max_new_tokens}")
    if prompt_tokens + max_new_tokens > cache_positions:
        limit = (f"the model's max_position_embeddings {model_positions}" if cache_positions == model_positions else
                 f"the KV cache's {cache_positions} positions (max_seq_len; the model allows up to {model_positions})")
        raise ValueError(f"{what} has {prompt_tokens} tokens + max_new_tokens {max_new_tokens} = "
                         f"{prompt_tokens + max_new_tokens}, more than {limit}")


def default_num_blocks(model: nn.Module, device: torch.device, dtype: torch.dtype, max_batch_size: int,
                       max_seq_len: int, block_size: int, gpu_memory_utilization: float) -> int:
    """The cache's blocks: 1 (scratch) + enough for max_batch_size sequences of max_seq_len, and on CUDA at most
    what fits in gpu_memory_utilization of the GPU's memory beside what is allocated already (the weights)."""
    wanted = 1 + max_batch_size * blocks_for(max_seq_len, block_size)
    if device.type != "cuda":
        return wanted
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    free, total = torch.cuda.mem_get_info(device)
    c = model.config
    block_bytes = 2 * c.n_layers * block_size * c.n_kv_heads * c.head_dim * dtype.itemsize
    budget = free - (1 - gpu_memory_utilization) * total
    return max(0, min(wanted, int(budget // block_bytes)))


class Engine:
    """A model, its tokenizer and a paged KV cache for up to ``max_batch_size`` running sequences.

    model: a decoder of fp6llm.models (``setup_caches``, ``forward(tokens, input_pos, logits_at, kv)``, ``config``).
    tokenizer: encode / decode / eos_token_ids (engine.tokenizer); None will do for requests of token ids.
    max_seq_len (the longest sequence, prompt + output) defaults to min(max_position_embeddings, 2048).
    num_blocks: cache blocks of BLOCK_SIZE positions (default: see the module docstring; one is scratch).
    max_step_tokens: tokens per step (decodes + prefill chunks). cuda_graph: capture decode steps on CUDA (False:
    eager everywhere). compile: run decode steps through torch.compile. One Engine per model at a time: a new one
    replaces the model's caches. Raises ValueError for a max_seq_len beyond the model's max_position_embeddings, a
    batch size < 1, or a cache too small for one sequence of max_seq_len.
    """

    def __init__(self, model: nn.Module, tokenizer, max_batch_size: int = 8, max_seq_len: Optional[int] = None,
                 cuda_graph: bool = True, compile: bool = False, num_blocks: Optional[int] = None,
                 max_step_tokens: Optional[int] = None,
                 gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION):
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
        if num_blocks is None:
            num_blocks = default_num_blocks(model, self.device, self.dtype, max_batch_size, max_seq_len, BLOCK_SIZE,
                                            gpu_memory_utilization)
        per_sequence = blocks_for(max_seq_len)
        if num_blocks < 1 + per_sequence:
            raise ValueError(f"a KV cache of {num_blocks} blocks of {BLOCK_SIZE} positions holds less than one "
                             f"sequence of max_seq_len {max_seq_len} ({per_sequence} blocks + 1 scratch): lower "
                             f"max_seq_len or free memory")
        self.num_blocks, self.block_size = num_blocks, BLOCK_SIZE
        model.setup_caches(max_batch_size, max_seq_len, self.dtype, self.device, num_blocks, BLOCK_SIZE)
        step_tokens = max_step_tokens or max(DEFAULT_STEP_TOKENS, 2 * max_batch_size)
        self.batcher = Batcher(BlockAllocator(num_blocks), BLOCK_SIZE, max_batch_size, step_tokens)
        self.sampler = DeviceSampler(max_batch_size, model.config.vocab_size, self.device)
        self.runner = Runner(model, self.sampler, max_batch_size, max_seq_len, BLOCK_SIZE, self.device, cuda_graph,
                             compile)
        self._texts: dict = {}  # Request -> CompletionText, while it runs (with a tokenizer)
        self.stats = Stats()

    # ---- what the engine serves ---------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def active(self) -> list:
        """Requests added and not finished: running, then waiting."""
        return self.batcher.running + list(self.batcher.waiting)

    @property
    def waiting(self) -> list:
        """Requests added and not admitted yet (or preempted), in the order they will be."""
        return list(self.batcher.waiting)

    @property
    def num_running(self) -> int:
        return len(self.batcher.running)

    @property
    def num_waiting(self) -> int:
        return len(self.batcher.waiting)

    @property
    def free_blocks(self) -> int:
        return self.batcher.allocator.num_free

    # ---- the step-level API -------------------------------------------------------------------------------------

    def check_length(self, prompt_tokens: int, max_new_tokens: int, what: str = "the prompt",
                     scoring: bool = False) -> None:
        """ValueError (with the numbers) unless a prompt of this many tokens plus max_new_tokens fits max_seq_len
        (max_new_tokens may be 0 when ``scoring``: asking for the prompt's logprobs)."""
        check_length(prompt_tokens, max_new_tokens, self.max_seq_len, self.model.config.max_position_embeddings, what,
                     scoring)

    def request(self, prompt: Union[str, Sequence[int]], max_new_tokens: int,
                sampling: SamplingParams = SamplingParams(), what: str = "the prompt", stop: Sequence[str] = ()
                ) -> Request:
        """A Request for a prompt (text, or token ids), checked; stops on ``stop_ids`` and the ``stop`` strings.
        max_new_tokens may be 0 with ``sampling.prompt_logprobs`` (the prompt's logprobs, nothing generated)."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        self.check_length(len(ids), max_new_tokens, what, sampling.prompt_logprobs is not None)
        return Request(ids, max_new_tokens, sampling, self.stop_ids, tuple(s for s in stop if s))

    def add(self, requests: Sequence[Request]) -> None:
        """Queue requests; ``step`` admits them as blocks free up. Raises ValueError (adding none of them) for a
        request that does not fit max_seq_len, or has stop strings but the engine no tokenizer."""
        for request in requests:
            self.check_length(len(request.prompt_ids), request.max_new_tokens,
                              scoring=request.sampling.prompt_logprobs is not None)
            if request.stop_strings and self.tokenizer is None:
                raise ValueError("stop strings need a tokenizer; this engine has none")
        for request in requests:
            request.seed = 0 if request.sampling.greedy else request.sampling.draw_seed()
            if request.sampling.prompt_logprobs is not None:
                request.prompt_logprobs = [None]  # the first token has no logprob: nothing comes before it
            if self.tokenizer is not None:
                self._texts[request] = CompletionText(self.tokenizer, request.prompt_ids, request.stop_strings)
            self.batcher.add(request)

    @torch.inference_mode()
    def step(self) -> list:
        """Schedule and run one step: prefill chunks, then one decode of every running request, each sampling on
        the device; then the new token ids come to the host in one copy. Returns an Event for each request that
        sampled a token or finished; finished requests have freed their blocks."""
        plan = self.batcher.schedule()
        for request in plan.admitted:
            self.sampler.set(request.slot, request.sampling, request.seed)
        drawn = []  # (requests, their next tokens, the logits they were drawn from) of each forward, on the device
        with static_weights():  # no kernel of a step writes a weight: early-launched kernels may read them
            if plan.prefill:
                synchronize(self.device)
                start = time.perf_counter()
                for group in self._prefill_groups(plan.prefill):
                    drawn += self._prefill(group)
                synchronize(self.device)
                self.stats.prefill_seconds += time.perf_counter() - start
                self.stats.prefill_tokens += sum(c.count for c in plan.prefill)
            if plan.decode:  # the device is idle: the last step's copy of its ids, or the prefill's end, waited for it
                start = time.perf_counter()
                tokens, logits = self.runner.decode(plan.decode, any(not r.sampling.greedy for r in plan.decode))
                for request in plan.decode:
                    self.batcher.advance(request, 1)
                drawn.append((plan.decode, tokens, logits))
        events = self._accept(drawn)
        if plan.decode:
            self.stats.step_seconds.append(time.perf_counter() - start)  # the token ids' copy synchronized
            self.stats.decode_tokens += len(plan.decode)
        return events

    def abort(self, request: Request) -> None:
        """End a request (waiting or running) with finish_reason "abort" and free its blocks."""
        self.batcher.finish(request)
        self._texts.pop(request, None)
        request.finish_reason = request.finish_reason or "abort"

    def warm_up(self) -> None:
        """On CUDA, capture the decode step's graph for every batch size now, so that the first requests do not
        wait for it (nothing to do elsewhere)."""
        with torch.inference_mode(), static_weights():
            self.runner.warm_up()

    def close(self) -> None:
        """Free the KV cache and the CUDA graphs (the model stays usable: a new Engine sets up new caches)."""
        for request in self.active:
            self.abort(request)
        self.runner.close()
        drop_caches(self.model)

    # ---- generation on top of the steps ------------------------------------------------------------------------

    def stream(self, prompts: Union[str, Sequence[str]], max_new_tokens: int = 128, temperature: float = 0.0,
               top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
               stop: Sequence[str] = ()) -> Iterator[Delta]:
        """Deltas of every prompt's completion, as they come (index = the prompt's position in ``prompts``).

        Prompt i samples with seed + i (its tokens do not depend on the other prompts); each stops at the first of
        the ``stop`` strings (not included). Every prompt is checked before anything runs (ValueError naming the
        prompt and the numbers).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        pending = [self.request(prompt, max_new_tokens,
                                SamplingParams(temperature, top_k, top_p, None if seed is None else seed + i),
                                f"prompt {i}" if len(prompts) > 1 else "the prompt", stop)
                   for i, prompt in enumerate(prompts)]
        return self._run(pending)

    def _run(self, pending: list) -> Iterator[Delta]:
        """Step until every request of ``pending`` has finished, yielding their Deltas. Other requests in the
        engine (a server's) are stepped along but not reported."""
        index = {r: i for i, r in enumerate(pending)}
        self.add(pending)
        running = set(pending)
        try:
            while running:
                for event in self.step():
                    if event.request in running:
                        if event.finish_reason is not None:
                            running.discard(event.request)
                        yield Delta(index[event.request], event.token_ids, event.text, event.finish_reason)
        finally:  # a consumer that stops early leaves no request of its own behind
            for request in running:
                self.abort(request)

    def generate(self, prompts: Union[str, Sequence[str]], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
                 stream: Union[bool, Callable[[Delta], None]] = False, stop: Sequence[str] = ()) -> list:
        """Completions (list[str], one per prompt, prompt text not included) of a prompt or a list of prompts.

        temperature 0 is greedy; ``stop`` strings end a completion (not included). stream: a callable gets every
        Delta as it comes; True prints the deltas of a single prompt to stdout. Resets and fills ``self.stats``.
        """
        callback = _print_delta if stream is True else stream or None
        self.stats = Stats()
        count = 1 if isinstance(prompts, str) else len(prompts)
        ids: list = [[] for _ in range(count)]
        texts = ["" for _ in range(count)]
        for delta in self.stream(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop):
            ids[delta.index] += delta.token_ids
            texts[delta.index] += delta.text
            if callback is not None:
                callback(delta)
        # without stop strings, the ids decoded at once (what a tokenizer's own decode of the completion gives)
        return texts if any(stop) else [self.tokenizer.decode(row) for row in ids]

    # ---- internals ----------------------------------------------------------------------------------------------

    def _prefill_groups(self, chunks: list) -> Iterator[list]:
        """The chunks, longest first, in forwards of at most the step's token budget once padded; a chunk of a
        request that wants its prompt's logprobs alone (its forward keeps the logits of every position)."""
        group: list = []
        for chunk in sorted(chunks, key=lambda c: -c.count):
            if chunk.request.sampling.prompt_logprobs is not None:
                yield [chunk]
                continue
            if group and group[0].count * (len(group) + 1) > self.batcher.max_step_tokens:
                yield group
                group = []
            group.append(chunk)
        if group:
            yield group

    def _prefill(self, group: list) -> list:
        """Run one prefill forward; sample the chunks that end their request's tokens. Returns [(requests, next
        tokens, logits)] (empty when no chunk samples); records the prompt logprobs of a scoring chunk."""
        scoring = group[0].request.sampling.prompt_logprobs is not None  # then alone in its group
        logits = self.runner.prefill(group, every_position=scoring)
        if scoring:
            self._record_prompt_logprobs(group[0], logits[0])
            logits = logits[:, group[0].count - 1]
        for chunk in group:
            self.batcher.advance(chunk.request, chunk.count)
        done = [i for i, chunk in enumerate(group) if chunk.samples]
        if not done:
            return []
        requests = [group[i].request for i in done]
        if len(done) < len(group):
            logits = logits[self._device_ints(done)]
        tokens = self.sampler(logits, self._device_ints([r.slot for r in requests]),
                              self._device_ints([r.length for r in requests]),
                              any(not r.sampling.greedy for r in requests))
        return [(requests, tokens, logits)]

    def _device_ints(self, values: list) -> torch.Tensor:
        """int64 [len(values)] on the engine's device (copied without a host synchronization)."""
        return to_device(torch.tensor(values, dtype=torch.long), self.device)

    def _record_prompt_logprobs(self, chunk, logits: torch.Tensor) -> None:
        """Append the logprobs of the prompt tokens this chunk predicts (logits [chunk.count, vocab]: position p's
        predict token p + 1) beyond those recorded already (a preempted request computes its prompt again)."""
        request = chunk.request
        recorded = request.prompt_logprobs
        first, last = max(len(recorded), chunk.start + 1), min(chunk.start + chunk.count, len(request.prompt_ids) - 1)
        if first <= last:
            rows = logits[first - 1 - chunk.start:last - chunk.start]
            targets = self._device_ints(request.prompt_ids[first:last + 1])
            recorded += token_logprobs(rows, targets, request.sampling.prompt_logprobs)

    def _accept(self, drawn: list) -> list:
        """Read the drawn tokens to the host (one copy), and append each to its request or finish the request (stop
        id, max_new_tokens, stop string; finished requests free their blocks). Returns their Events."""
        if not drawn:
            return []
        ids = torch.cat([tokens for _, tokens, _ in drawn]).tolist()
        events = []
        for requests, tokens, logits in drawn:
            row_ids, ids = ids[:len(requests)], ids[len(requests):]
            logprobs = self._logprobs(requests, tokens, logits)
            for request, token in zip(requests, row_ids):
                events.append(self._append(request, token, logprobs.get(request)))
        return events

    def _logprobs(self, requests: list, tokens: torch.Tensor, logits: torch.Tensor) -> dict:
        """{request: TokenLogprob of its new token} for the requests that ask for logprobs (one more copy to the
        host, in the steps that have such requests only)."""
        rows = [i for i, r in enumerate(requests) if r.sampling.logprobs is not None]
        if not rows:
            return {}
        top = max(requests[i].sampling.logprobs for i in rows)
        index = self._device_ints(rows)
        found = token_logprobs(logits[index], tokens[index], top)
        return {requests[i]: found[k].trimmed(requests[i].sampling.logprobs) for k, i in enumerate(rows)}

    def _append(self, request: Request, token: int, logprob) -> Event:
        """The Event of one drawn token (and its TokenLogprob, or None) for its request."""
        new, finish = [token], None
        if request.max_new_tokens == 0:  # a scoring request: its prompt's logprobs were the work
            new, finish = [], "length"
        elif token in request.stop_ids:
            new, finish = [], "stop"
        else:
            request.output_ids.append(token)
            if len(request.output_ids) >= request.max_new_tokens:
                finish = "length"
        text, stopped = "", False
        completion = self._texts.get(request)
        if completion is not None:
            text, stopped = completion.push(new, finish is not None)
        if finish is not None or stopped:
            request.finish_reason = "stop" if stopped else finish
            self.batcher.finish(request)
            self._texts.pop(request, None)
        drawn = logprob is not None and request.max_new_tokens > 0  # a stop id's too: OpenAI and vLLM show it
        return Event(request, new, text, request.finish_reason, [logprob] if drawn else [])


def _print_delta(delta: Delta) -> None:
    print(delta.text, end="\n" if delta.finish_reason else "", flush=True)
