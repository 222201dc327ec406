"""The one scheduler: which requests run in the next forward pass, and how many of their tokens.

Every request holds the blocks of its positions in the paged KV cache (models/attention.py) and a count of the
tokens whose keys and values are already there (``computed``). A step processes, for each scheduled request, the
tokens ``computed .. computed + n`` of prompt + output and, when that reaches its last token, samples the next one.
Decoding is the case n = 1; a prompt is prefilled in chunks under a token budget per step (chunked prefill, as in
vLLM and DeepSpeed-FastGen's SplitFuse), so a long prompt takes a few steps instead of stalling every running
request's next token.

Each step: (1) every running request with one token to go decodes; one that needs a new block and finds none free
makes the newest running request give its blocks back (preemption: it goes to the front of the queue and its prompt
and output so far are prefilled again later; greedy tokens do not change). (2) Requests part-way through their
prefill take the token budget left, oldest first. (3) Waiting requests are admitted in arrival order while the free
blocks hold all their tokens so far and fewer than ``max_seqs`` run; each is given a chunk of the budget left.
Prefix caching: an admitted request first shares the cached blocks of its longest known prefix (engine/blocks.py;
full blocks, registered as they are computed) and computes only the rest; one that asks for its prompt's logprobs
computes every position (in chunks of at most SCORING_CHUNK tokens, which bounds its [tokens, vocab] logits).
Each running request holds one of ``max_seqs`` sampler slots (the index of its sampling settings on the device,
engine/sampling.py) from its admission until it finishes or is preempted; ``Plan.admitted`` says who took one.
Everything is decided from the calls alone (no clocks), so every tensor-parallel rank schedules alike.
"""

from __future__ import annotations

import collections
import heapq
from dataclasses import dataclass, field
from typing import Optional

from ..models.attention import blocks_for
from .blocks import BlockAllocator, prefix_hashes
from .sampling import SamplingParams

SCORING_CHUNK = 512  # prompt tokens per step of a request that wants its prompt's logprobs


@dataclass(eq=False)  # a request is itself, not its fields: usable in sets and as a dict key
class Request:
    """One prompt's generation. The engine fills in output_ids, finish_reason and its own bookkeeping.

    stop_ids end the generation when sampled (not put in output_ids); stop_strings when the decoded text contains
    one (the text up to it is the completion; needs the engine's tokenizer). finish_reason: None while running;
    "stop" (a stop id or stop string), "length" (max_new_tokens reached) or "abort".
    """

    prompt_ids: list
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset = frozenset()
    stop_strings: tuple = ()
    output_ids: list = field(default_factory=list)
    finish_reason: Optional[str] = None
    seed: int = 0  # the seed of its draws (SamplingParams.draw_seed, drawn once when the engine takes it)
    slot: int = -1  # its sampler slot while it runs
    prompt_logprobs: Optional[list] = None  # with sampling.prompt_logprobs: [None, TokenLogprob of prompt token 1, ..]
    blocks: list = field(default_factory=list)  # the cache blocks of positions 0, BLOCK_SIZE, 2 * BLOCK_SIZE, ...
    computed: int = 0  # tokens (of prompt + output) whose keys and values are in the cache
    arrival: int = -1  # order of admission to the engine
    preemptions: int = 0
    cached_tokens: int = 0  # prompt tokens found in the prefix cache (not computed) at the last admission
    block_hashes: list = field(default_factory=list)  # prefix hashes of the full blocks of its tokens so far
    registered: int = 0  # blocks of ``blocks`` registered in (or shared from) the prefix cache

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        """Tokens so far: prompt + output."""
        return len(self.prompt_ids) + len(self.output_ids)

    def token(self, position: int) -> int:
        prompt = len(self.prompt_ids)
        return self.prompt_ids[position] if position < prompt else self.output_ids[position - prompt]


@dataclass
class Chunk:
    """Tokens start .. start + count - 1 of a request, processed in this step; ``samples``: they end its tokens."""

    request: Request
    start: int
    count: int

    @property
    def samples(self) -> bool:
        return self.start + self.count == self.request.length


@dataclass
class Plan:
    """One step: decode (one token each), prefill chunks, the requests preempted to make room, and those admitted
    (each with a new sampler slot)."""

    decode: list
    prefill: list
    preempted: list
    admitted: list = field(default_factory=list)


class Batcher:
    """Waiting and running requests over a BlockAllocator; ``schedule`` plans a step, ``finish`` / ``abort`` end a
    request and free its blocks."""

    def __init__(self, allocator: BlockAllocator, block_size: int, max_seqs: int, max_step_tokens: int):
        if max_seqs < 1:
            raise ValueError(f"max_seqs must be >= 1, got {max_seqs}")
        if max_step_tokens <= max_seqs:
            raise ValueError(f"max_step_tokens ({max_step_tokens}) must exceed max_seqs ({max_seqs}), so that "
                             f"prefill gets a share of every step")
        self.allocator, self.block_size = allocator, block_size
        self.max_seqs, self.max_step_tokens = max_seqs, max_step_tokens
        self.waiting: collections.deque = collections.deque()
        self.running: list = []  # in arrival order
        self._arrivals = 0
        self._free_slots = list(range(max_seqs))  # a heap: the lowest free slot first

    def add(self, request: Request) -> None:
        request.arrival, self._arrivals = self._arrivals, self._arrivals + 1
        self.waiting.append(request)

    def finish(self, request: Request) -> None:
        """Take a request out (finished or aborted) and free its blocks; harmless for one already out."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._release(request)

    def schedule(self) -> Plan:
        plan = Plan([], [], [])
        for request in list(self.running):
            if request in plan.preempted or request.length - request.computed != 1:
                continue
            while not self._grow(request, request.length):
                victim = self.running[-1]
                self._preempt(victim)
                plan.preempted.append(victim)
                if victim is request:
                    break
            else:
                plan.decode.append(request)
        budget = self.max_step_tokens - len(plan.decode)
        for request in self.running:
            if budget > 0 and request.length - request.computed > 1:
                budget -= self._chunk(plan, request, budget)
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            request = self.waiting[0]
            if not self._admit(request):
                break
            self.running.append(self.waiting.popleft())
            request.slot = heapq.heappop(self._free_slots)
            plan.admitted.append(request)
            budget -= self._chunk(plan, request, budget)
        return plan

    def _chunk(self, plan: Plan, request: Request, budget: int) -> int:
        count = min(request.length - request.computed, budget)
        if request.sampling.prompt_logprobs is not None:
            count = min(count, SCORING_CHUNK)
        if count == 1 and request.computed == request.length - 1:
            plan.decode.append(request)
        else:
            plan.prefill.append(Chunk(request, request.computed, count))
        return count

    def advance(self, request: Request, count: int) -> None:
        """``count`` more tokens of the request are in the cache: register its newly full blocks by prefix hash."""
        request.computed += count
        full = request.computed // self.block_size
        if full > request.registered:
            for block, value in zip(request.blocks[request.registered:full],
                                    self._hashes(request, full)[request.registered:]):
                self.allocator.register(block, value)
            request.registered = full

    def _hashes(self, request: Request, full: int) -> list:
        """The request's prefix hashes of its first ``full`` blocks (computed once per block)."""
        known = request.block_hashes
        if full > len(known):
            size = self.block_size
            tokens = [request.token(p) for p in range(len(known) * size, full * size)]
            known += prefix_hashes(tokens, size, known[-1] if known else None)
        return known[:full]

    def _admit(self, request: Request) -> bool:
        """Give a waiting request the cached blocks of its longest known prefix (leaving at least its last token
        to compute) and new blocks for the rest; False (nothing taken) when too few are free."""
        scoring = request.sampling.prompt_logprobs is not None
        known = [] if scoring else self._hashes(request, (request.length - 1) // self.block_size)
        shared = self.allocator.lookup(known)
        needed = blocks_for(request.length, self.block_size) - len(shared)
        if needed + sum(self.allocator.is_free(b) for b in shared) > self.allocator.num_free:
            return False
        self.allocator.share(shared)
        request.blocks = shared + self.allocator.allocate(needed)
        request.registered = len(shared)
        request.computed = request.cached_tokens = len(shared) * self.block_size
        return True

    def _grow(self, request: Request, positions: int) -> bool:
        """Give the request blocks for ``positions`` positions; False (nothing taken) when too few are free."""
        needed = blocks_for(positions, self.block_size) - len(request.blocks)
        if needed > self.allocator.num_free:
            return False
        if needed > 0:
            request.blocks += self.allocator.allocate(needed)
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._release(request)
        request.preemptions += 1
        self.waiting.appendleft(request)

    def _release(self, request: Request) -> None:
        self.allocator.free(request.blocks)
        request.blocks, request.computed, request.registered = [], 0, 0
        if request.slot >= 0:
            heapq.heappush(self._free_slots, request.slot)
            request.slot = -1
