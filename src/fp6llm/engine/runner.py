"""Forward passes over the paged cache: the inputs of a step's prefill chunks and decodes, and CUDA graphs.

The runner turns the batcher's plan into model inputs: tokens and positions [B, T] and a KVBatch (block tables,
sequence lengths, slot mapping; models/attention.py). Prefill chunks run eagerly, right-padded (padding tokens write
to the scratch block). Decodes are one token per request; on CUDA the decode forward of B rows (B rounded up to a
power of two) is captured once as a CUDA graph over static buffers and replayed: the block tables span a whole
``max_seq_len`` there, and padding rows decode token 0 at position 0 into the scratch block. Eager decodes gather only
as many block-table columns as the longest row needs.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from ..models.attention import NULL_BLOCK, KVBatch, PagedKVCache, blocks_for

def synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class DecodeGraph:
    """The decode forward of ``rows`` rows captured as a CUDA graph over views of the runner's static buffers."""

    def __init__(self, model: nn.Module, inputs: tuple, pool):
        tokens, positions, kv = inputs
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside capture: Triton compiles, scratch buffers allocate
            for _ in range(2):
                model(tokens, positions, kv=kv)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = model(tokens, positions, kv=kv)

    def __call__(self) -> Tensor:
        self.graph.replay()
        return self.logits


class Runner:
    """Runs a model's prefill and decode forwards for requests that hold blocks of its paged cache."""

    def __init__(self, model: nn.Module, max_batch_size: int, max_seq_len: int, block_size: int, device,
                 cuda_graph: bool, compile: bool):
        self.model, self.device, self.block_size = model, device, block_size
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
        self._graphs: dict = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.use_cuda_graph else None

    def slot(self, request, position: int) -> int:
        return request.blocks[position // self.block_size] * self.block_size + position % self.block_size

    def prefill(self, chunks: list) -> Tensor:
        """Logits [len(chunks), vocab] of each chunk's last token; chunks: batcher.Chunk, blocks allocated."""
        longest = max(c.count for c in chunks)
        width = max(blocks_for(c.start + c.count, self.block_size) for c in chunks)
        tokens = torch.zeros(len(chunks), longest, dtype=torch.long)
        positions = torch.zeros(len(chunks), longest, dtype=torch.long)
        slots = torch.full((len(chunks), longest), self.padding_slot, dtype=torch.int32)
        tables = torch.full((len(chunks), width), NULL_BLOCK, dtype=torch.int32)
        for row, chunk in enumerate(chunks):
            request, span = chunk.request, range(chunk.start, chunk.start + chunk.count)
            tokens[row, :chunk.count] = torch.tensor([request.token(p) for p in span])
            positions[row, :chunk.count] = torch.tensor(span)
            slots[row, :chunk.count] = torch.tensor([self.slot(request, p) for p in span], dtype=torch.int32)
            used = request.blocks[:width]
            tables[row, :len(used)] = torch.tensor(used, dtype=torch.int32)
        seq_lens = torch.tensor([c.start + c.count for c in chunks], dtype=torch.int32)
        last = torch.tensor([[c.count - 1] for c in chunks])
        kv = KVBatch(*(t.to(self.device) for t in (tables, seq_lens, slots)))
        return self.model(tokens.to(self.device), positions.to(self.device), logits_at=last.to(self.device),
                          kv=kv)[:, -1]

    def decode(self, requests: list) -> Tensor:
        """Logits [len(requests), vocab] of one decode step: each request's last token at its last position."""
        count = len(requests)
        rows = self.graph_rows(count) if self.use_cuda_graph else count
        width = self.max_blocks if self.static_width else max(len(r.blocks) for r in requests)
        tokens = torch.zeros(rows, 1, dtype=torch.long)
        positions = torch.zeros(rows, 1, dtype=torch.long)
        tables = torch.full((rows, width), NULL_BLOCK, dtype=torch.int32)
        seq_lens = torch.ones(rows, dtype=torch.int32)
        slots = torch.full((rows, 1), self.padding_slot, dtype=torch.int32)
        for row, request in enumerate(requests):
            last = request.length - 1
            tokens[row, 0], positions[row, 0], seq_lens[row] = request.token(last), last, request.length
            slots[row, 0] = self.slot(request, last)
            tables[row, :len(request.blocks)] = torch.tensor(request.blocks, dtype=torch.int32)
        if not self.use_cuda_graph:
            kv = KVBatch(*(t.to(self.device) for t in (tables, seq_lens, slots)))
            return self.decode_model(tokens.to(self.device), positions.to(self.device), kv=kv)[:count, -1]
        # one host-to-device copy per buffer, into the static buffers the graph reads
        for buffer, value in ((self.tokens, tokens), (self.positions, positions), (self.block_tables, tables),
                              (self.seq_lens, seq_lens), (self.slot_mapping, slots)):
            buffer[:rows].copy_(value)
        graph = self._graph(rows)
        if graph is None:
            return self.decode_model(*self._static_inputs(rows))[:count, -1]
        return graph()[:count, -1]

    def graph_rows(self, count: int) -> int:
        """The captured batch size that ``count`` decodes run at: the next power of two, at most max_batch_size."""
        return min(1 << (count - 1).bit_length(), self.max_batch_size)

    def warm_up(self) -> None:
        """Capture the decode graph of every batch size a step can use (padding rows only; the cache's scratch
        block is all they write)."""
        if not self.use_cuda_graph:
            return
        sizes = sorted({self.graph_rows(n) for n in range(1, self.max_batch_size + 1)})
        self.tokens.zero_(), self.positions.zero_(), self.block_tables.fill_(NULL_BLOCK)
        self.seq_lens.fill_(1), self.slot_mapping.fill_(self.padding_slot)
        for rows in sizes:
            self._graph(rows)

    def close(self) -> None:
        self._graphs.clear()

    def _static_inputs(self, rows: int) -> tuple:
        kv = KVBatch(self.block_tables[:rows], self.seq_lens[:rows], self.slot_mapping[:rows])
        return self.tokens[:rows], self.positions[:rows], kv

    def _graph(self, rows: int) -> Optional[DecodeGraph]:
        if self.use_cuda_graph and rows not in self._graphs:
            try:
                self._graphs[rows] = DecodeGraph(self.decode_model, self._static_inputs(rows), self._graph_pool)
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError as err:  # an op that cannot be captured: slower, still right
                warnings.warn(f"capturing the decode step as a CUDA graph failed, decoding eagerly: {err}")
                self.use_cuda_graph = False
        return self._graphs.get(rows)


def drop_caches(model: nn.Module) -> None:
    """Remove every PagedKVCache from ``model`` (their memory is freed once nothing else holds them)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, PagedKVCache):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, None)
