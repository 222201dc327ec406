"""Forward passes over the paged cache: the inputs of a step's prefill chunks and decodes, and CUDA graphs.

The runner turns the batcher's plan into model inputs: tokens and positions [B, T] and a KVBatch (block tables,
sequence lengths, slot mapping; models/attention.py). Prefill chunks are right-padded (padding tokens write to the
scratch block); on CUDA a prefill of a power of two of chunks and up to PREFILL_GRAPH_TOKENS padded tokens runs as
a CUDA graph, one per (rows, longest chunk rounded up to a PREFILL_GRAPH_LENGTHS length) captured on first use,
since an eager forward of a short prompt is bound by the host's launches (bench/profile_prefill.py: 128 tokens of a
13B model, 9-11 ms of kernels in 15-29 ms eager on an H200, 2026-12-04); longer prefills, other counts of chunks, a
prompt's logprobs and torch.compile run eagerly. Decodes are one token per request and end with the sampling step
(engine/sampling.py's DeviceSampler, each row reading its request's sampler slot): on CUDA the decode forward and
sampling of B rows (B rounded up to a power of two) are captured once as a CUDA graph over static buffers and
replayed, one graph with the sampling step and one with argmax only (no row samples); the block tables span a whole
``max_seq_len`` there, and padding rows decode token 0 at position 0 into the scratch block, greedily in the
sampler's padding slot. Eager decodes (CPU, or no graphs) run the same ops and gather only as many block-table
columns as the longest row needs.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from ..models.attention import NULL_BLOCK, KVBatch, PagedKVCache, blocks_for
from .sampling import DeviceSampler

PREFILL_GRAPH_LENGTHS = (16, 32, 64, 128, 256)  # padded chunk lengths of the prefill graphs
PREFILL_GRAPH_TOKENS = 512  # rows x padded length at most: a longer prefill keeps the GPU busy eagerly


def synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def staged(tensor: Tensor, device) -> Tensor:
    """A host tensor ready for a copy to ``device`` that does not wait: pinned on CUDA (a copy from pageable memory
    synchronizes the host with the stream), itself elsewhere."""
    return tensor.pin_memory() if torch.device(device).type == "cuda" else tensor


def to_device(tensor: Tensor, device) -> Tensor:
    """A host tensor on ``device``, copied without a host synchronization."""
    return staged(tensor, device).to(device, non_blocking=True)


def decode_step(model: nn.Module, sampler: DeviceSampler, inputs: tuple, slots: Tensor, sampling: bool) -> tuple:
    """(next tokens int64 [B], logits float [B, vocab]) of one decode forward: inputs (tokens, positions, kv) of B
    rows, each sampling in its sampler slot (int64 [B]) the token of the position after its last."""
    tokens, positions, kv = inputs
    logits = model(tokens, positions, kv=kv)[:, -1]
    return sampler(logits, slots, positions[:, -1] + 1, sampling), logits


class DecodeGraph:
    """``decode_step`` of ``rows`` rows captured as a CUDA graph over views of the runner's static buffers."""

    def __init__(self, step, pool):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside capture: Triton compiles, scratch buffers allocate
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = step()

    def __call__(self) -> tuple:
        self.graph.replay()
        return self.outputs


class PrefillGraph(DecodeGraph):
    """A prefill forward of fixed rows x length captured as a CUDA graph over buffers of its own: tokens, positions
    [R, L], block tables [R, W], sequence lengths [R], slot mapping [R, L], the logits' token index [R, 1]; called,
    the logits [R, vocab] of each row's token at that index."""

    def __init__(self, model: nn.Module, inputs: tuple, device, pool):
        self.buffers = [value.to(device) for value in inputs]
        tokens, positions, tables, seq_lens, slots, last = self.buffers
        kv = KVBatch(tables, seq_lens, slots)
        super().__init__(lambda: model(tokens, positions, logits_at=last, kv=kv)[:, -1], pool)

    def load(self, inputs: tuple, device) -> None:
        for buffer, value in zip(self.buffers, inputs):
            buffer.copy_(staged(value, device), non_blocking=True)


class Runner:
    """Runs a model's prefill and decode forwards for requests that hold blocks of its paged cache; decodes sample
    with ``sampler`` (whose slots the engine sets as requests join)."""

    def __init__(self, model: nn.Module, sampler: DeviceSampler, max_batch_size: int, max_seq_len: int,
                 block_size: int, device, cuda_graph: bool, compile: bool):
        self.model, self.sampler, self.device, self.block_size = model, sampler, device, block_size
        self.padding_slot = NULL_BLOCK * block_size  # the scratch block's first slot: where padding tokens write
        self.max_batch_size, self.max_blocks = max_batch_size, blocks_for(max_seq_len, block_size)
        self.use_cuda_graph = cuda_graph and torch.device(device).type == "cuda"
        self.static_width = self.use_cuda_graph or compile  # same shapes every step: full-width block tables
        self.decode_model = torch.compile(model, fullgraph=True, dynamic=False) if compile else model
        rows = max_batch_size
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.block_tables = torch.full((rows, self.max_blocks), NULL_BLOCK, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(rows, dtype=torch.int32, device=device)
        self.slot_mapping = torch.full((rows, 1), self.padding_slot, dtype=torch.int32, device=device)
        self.sampler_slots = torch.full((rows,), sampler.padding_slot, dtype=torch.long, device=device)
        self._graphs: dict = {}  # (rows, sampling): DecodeGraph; ("prefill", rows, length): PrefillGraph
        self._graph_pool = torch.cuda.graph_pool_handle() if self.use_cuda_graph else None
        self.prefill_graphs = self.use_cuda_graph and not compile  # PREFILL_GRAPH_TOKENS and shorter

    def slot(self, request, position: int) -> int:
        return request.blocks[position // self.block_size] * self.block_size + position % self.block_size

    def prefill(self, chunks: list, every_position: bool = False) -> Tensor:
        """Logits [len(chunks), vocab] of each chunk's last token, or with every_position [len(chunks), longest
        chunk, vocab] of each of its tokens (for a prompt's logprobs); chunks: batcher.Chunk, blocks allocated."""
        rows, longest = len(chunks), max(c.count for c in chunks)
        padded = None if every_position else self.prefill_graph_length(rows, longest)
        if padded is not None:  # a graph's shapes: the padded length, full-width block tables
            longest, width = padded, self.max_blocks
        else:
            width = max(blocks_for(c.start + c.count, self.block_size) for c in chunks)
        tokens = torch.zeros(rows, longest, dtype=torch.long)
        positions = torch.zeros(rows, longest, dtype=torch.long)
        slots = torch.full((rows, longest), self.padding_slot, dtype=torch.int32)
        tables = torch.full((rows, width), NULL_BLOCK, dtype=torch.int32)
        for row, chunk in enumerate(chunks):
            request, span = chunk.request, range(chunk.start, chunk.start + chunk.count)
            tokens[row, :chunk.count] = torch.tensor([request.token(p) for p in span])
            positions[row, :chunk.count] = torch.tensor(span)
            slots[row, :chunk.count] = torch.tensor([self.slot(request, p) for p in span], dtype=torch.int32)
            used = request.blocks[:width]
            tables[row, :len(used)] = torch.tensor(used, dtype=torch.int32)
        seq_lens = torch.tensor([c.start + c.count for c in chunks], dtype=torch.int32)
        last = torch.tensor([[c.count - 1] for c in chunks])
        if padded is not None:
            graph = self._prefill_graph(rows, longest, (tokens, positions, tables, seq_lens, slots, last))
            if graph is not None:
                return graph().clone()  # the graph's output is overwritten by its next replay
        kv = KVBatch(*(to_device(t, self.device) for t in (tables, seq_lens, slots)))
        tokens, positions = to_device(tokens, self.device), to_device(positions, self.device)
        if every_position:
            return self.model(tokens, positions, kv=kv)
        return self.model(tokens, positions, logits_at=to_device(last, self.device), kv=kv)[:, -1]

    def prefill_graph_length(self, count: int, longest: int) -> "int | None":
        """The padded length of the CUDA graph that prefills ``count`` chunks of at most ``longest`` tokens, or None
        where that prefill runs eagerly (no graphs, too long, more than PREFILL_GRAPH_TOKENS padded, or a count of
        chunks that is not a power of two: padding rows, with no tokens of their own, have not yet run on a GPU)."""
        if not self.prefill_graphs:
            return None
        length = next((n for n in PREFILL_GRAPH_LENGTHS if n >= longest), None)
        if length is None or count & (count - 1) or count * length > PREFILL_GRAPH_TOKENS:
            return None
        return length

    def _prefill_graph(self, rows: int, length: int, inputs: tuple) -> "PrefillGraph | None":
        """The prefill graph of this shape with ``inputs`` (host tensors) in its buffers; captured on first use (its
        warm-up forwards then compute this prefill, writing the same keys and values as the replay)."""
        graph = self._graphs.get(("prefill", rows, length))
        if graph is not None:
            graph.load(inputs, self.device)
            return graph
        try:
            graph = PrefillGraph(self.model, inputs, self.device, self._graph_pool)
        except RuntimeError as err:  # out of memory (a graph keeps its activations), or an op that cannot be captured
            warnings.warn(f"capturing a prefill as a CUDA graph failed, prefilling eagerly from now on: {err}")
            self.prefill_graphs = False
            torch.cuda.empty_cache()
            return None
        self._graphs[("prefill", rows, length)] = graph
        return graph

    def decode(self, requests: list, sampling: bool) -> tuple:
        """One decode step: each request's last token at its last position, then its next token drawn in its
        sampler slot. Returns (tokens int64 [len(requests)], logits float [len(requests), vocab]), on the device
        (the logits of a captured step are overwritten by the next). sampling=False: every row is greedy."""
        count = len(requests)
        rows = self.graph_rows(count) if self.use_cuda_graph else count
        width = self.max_blocks if self.static_width else max(len(r.blocks) for r in requests)
        # One tensor per field from Python lists (not a tensor op per row: ~0.4 ms a step at 32 rows on a CPU);
        # rows past ``count`` pad a captured batch.
        pad = rows - count
        lasts = [request.length - 1 for request in requests]
        tokens = torch.tensor([r.token(last) for r, last in zip(requests, lasts)] + [0] * pad)[:, None]
        positions = torch.tensor(lasts + [0] * pad)[:, None]
        seq_lens = torch.tensor([r.length for r in requests] + [1] * pad, dtype=torch.int32)
        slots = torch.tensor([self.slot(r, last) for r, last in zip(requests, lasts)] + [self.padding_slot] * pad,
                             dtype=torch.int32)[:, None]
        sampler_slots = torch.tensor([r.slot for r in requests] + [self.sampler.padding_slot] * pad)
        tables = torch.tensor([r.blocks + [NULL_BLOCK] * (width - len(r.blocks)) for r in requests]
                              + [[NULL_BLOCK] * width] * pad, dtype=torch.int32)
        if not self.use_cuda_graph:
            kv = KVBatch(*(to_device(t, self.device) for t in (tables, seq_lens, slots)))
            inputs = (to_device(tokens, self.device), to_device(positions, self.device), kv)
            return decode_step(self.decode_model, self.sampler, inputs, to_device(sampler_slots, self.device),
                               sampling)
        # one host-to-device copy per buffer, into the static buffers the graph reads
        for buffer, value in ((self.tokens, tokens), (self.positions, positions), (self.block_tables, tables),
                              (self.seq_lens, seq_lens), (self.slot_mapping, slots),
                              (self.sampler_slots, sampler_slots)):
            buffer[:rows].copy_(staged(value, self.device), non_blocking=True)
        graph = self._graph(rows, sampling)
        next_tokens, logits = graph() if graph is not None else self._static_step(rows, sampling)()
        return next_tokens[:count], logits[:count]

    def graph_rows(self, count: int) -> int:
        """The captured batch size that ``count`` decodes run at: the next power of two, at most max_batch_size."""
        return min(1 << (count - 1).bit_length(), self.max_batch_size)

    def warm_up(self) -> None:
        """Capture the decode graphs (greedy, and sampling) of every batch size a step can use (padding rows only;
        the cache's scratch block is all they write)."""
        if not self.use_cuda_graph:
            return
        sizes = sorted({self.graph_rows(n) for n in range(1, self.max_batch_size + 1)})
        self.tokens.zero_(), self.positions.zero_(), self.block_tables.fill_(NULL_BLOCK)
        self.seq_lens.fill_(1), self.slot_mapping.fill_(self.padding_slot)
        self.sampler_slots.fill_(self.sampler.padding_slot)
        for rows in sizes:
            for sampling in (False, True):
                self._graph(rows, sampling)

    def close(self) -> None:
        self._graphs.clear()

    def _static_step(self, rows: int, sampling: bool):
        """``decode_step`` over the first ``rows`` rows of the static buffers, as a function of nothing."""
        kv = KVBatch(self.block_tables[:rows], self.seq_lens[:rows], self.slot_mapping[:rows])
        inputs = (self.tokens[:rows], self.positions[:rows], kv)
        return lambda: decode_step(self.decode_model, self.sampler, inputs, self.sampler_slots[:rows], sampling)

    def _graph(self, rows: int, sampling: bool) -> Optional[DecodeGraph]:
        key = rows, sampling
        if self.use_cuda_graph and key not in self._graphs:
            try:
                self._graphs[key] = DecodeGraph(self._static_step(rows, sampling), self._graph_pool)
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError as err:  # an op that cannot be captured: slower, still right
                warnings.warn(f"capturing the decode step as a CUDA graph failed, decoding eagerly: {err}")
                self.use_cuda_graph = False
        return self._graphs.get(key)


def drop_caches(model: nn.Module) -> None:
    """Remove every PagedKVCache from ``model`` (their memory is freed once nothing else holds them)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, PagedKVCache):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, None)
