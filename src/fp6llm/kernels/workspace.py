"""Device buffers that kernels keep between launches, made so that CUDA-graph capture never allocates.

A captured graph keeps the pointers it saw, so a buffer that had to grow (or be made) while a capture is under way
would leave the graph pointing at freed memory, and the allocation itself is refused during capture. Both kinds of
buffer here are made on first use and raise a one-line error, naming what to do, when first use falls inside a
capture: run the layer once at that batch size before capturing (the engine's warm-up does).
"""

from __future__ import annotations

from typing import Callable

import torch


def _refuse_during_capture(what: str) -> None:
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{what} during a CUDA-graph capture; run the layer once at this batch size before "
                           f"capturing")


class SplitWorkspace:
    """float32 split-K partials and int32 arrival counters of one device (the counters are back at zero after every
    launch: the last CTA of a tile resets its counter). Grown, never shrunk; kernels on one stream can share it.

    A buffer that is outgrown stays allocated (``retired``): the engine captures its decode graphs one batch size
    after another, and a graph captured at a small batch keeps the pointer it saw even when a larger batch's
    warm-up grows the workspace afterwards (the CUDA mid-M kernel and the Triton kernel reserve by M)."""

    def __init__(self):
        self.buffers = {}
        self.retired = []

    def reserve(self, device, ws_elems: int, counters: int) -> tuple:
        ws, counts = self.buffers.get(device, (None, None))
        if ws is not None and ws.numel() >= ws_elems and counts.numel() >= counters:
            return ws, counts
        _refuse_during_capture(f"the split-K workspace must grow to {ws_elems} floats and {counters} counters")
        if ws is not None:
            self.retired.append((ws, counts))  # a captured graph may still point here
        ws = torch.empty(max(ws_elems, 1 << 22, 0 if ws is None else ws.numel()), dtype=torch.float32, device=device)
        counts = torch.zeros(max(counters, 4096, 0 if counts is None else counts.numel()), dtype=torch.int32,
                             device=device)
        self.buffers[device] = (ws, counts)
        return ws, counts


class DeviceConstants:
    """Small constant tensors (e.g. a format's rotation table) made once per key and device, before any capture."""

    def __init__(self):
        self.tensors = {}

    def get(self, key, device, build: Callable[[], list], dtype: torch.dtype = torch.int32) -> torch.Tensor:
        index = (key, str(device))
        if index not in self.tensors:
            _refuse_during_capture(f"the constant table {key!r} would be copied to {device}")
            self.tensors[index] = torch.tensor(build(), dtype=dtype, device=device).view(-1)
        return self.tensors[index]


WORKSPACE = SplitWorkspace()  # shared by the Triton and CUDA kernels
CONSTANTS = DeviceConstants()
