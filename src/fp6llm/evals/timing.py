"""Timing that holds up on a GPU at its power limit: CUDA graphs of back-to-back calls over rotating copies.

The one timing helper of fp6llm's measurements: the benchmark scripts of bench/ and the end-to-end throughput bench
(evals/throughput.py). Each timed case captures a graph of >= 16 calls that cycle through enough copies of their
operands that >= 256 MiB pass between two uses of one copy (the H100's L2 is 50 MB), and reports the median of the
replays divided by the calls per graph. Off CUDA (a CPU run of the throughput bench) calls are timed one by one
with perf_counter, the median of the repeats.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from ..formats import resolve_device

ROTATE_BYTES = 256 * 2**20


def copies_needed(bytes_per_call: int, limit: int = 64) -> int:
    return min(limit, max(2, math.ceil(ROTATE_BYTES / max(bytes_per_call, 1)) + 1))


def time_calls(calls, replays: int = 15, min_calls: int = 16) -> float:
    """Median seconds per call of ``calls`` (zero-argument callables on distinct operand copies), replayed as a graph."""
    sequence = [calls[i % len(calls)] for i in range(max(min_calls, len(calls)))]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture: compiles kernels, allocates scratch buffers
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in sequence:
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(sequence))
    del graph
    return statistics.median(times)


def _seconds_per_call(call, device: torch.device, repeats: int) -> float:
    """time_calls on CUDA; elsewhere the median of ``repeats`` perf_counter-timed calls after one warm-up."""
    if device.type == "cuda":
        return time_calls([call], replays=repeats, min_calls=4)
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device="cuda", nbytes: int = 2 * 2**30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    device = torch.device(device)
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = _seconds_per_call(lambda: dst.copy_(src), device, repeats)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes / seconds


def read_bandwidth(device="cuda", nbytes: int = 2 * 2**30) -> float:
    """Bytes/s of a large reduction (read-only traffic, as a weight-streaming kernel does); CUDA only."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    seconds = time_calls([lambda: src.sum(dtype=torch.float32)], replays=10, min_calls=4)
    del src
    torch.cuda.empty_cache()
    return nbytes / seconds


def device_name(device=None) -> str:
    """The GPU's name ("NVIDIA H200"), or "cpu"; device default: CUDA when available."""
    device = resolve_device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def describe_device(device="cuda") -> dict:
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "sms": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
            "torch": torch.__version__, "cuda": torch.version.cuda}
