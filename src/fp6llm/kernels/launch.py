"""Programmatic dependent launch (PDL, Hopper) for the kernels of a decode step.

A kernel launched with programmatic stream serialization may start while the kernel before it in the stream is still
running: its CTAs become resident and wait (griddepcontrol.wait) until that kernel has completed and its writes are
visible, so the launch latency and the ramp of the next kernel overlap the tail of the previous one. Every kernel of
the project that takes a PDL flag waits before it touches global memory and then lets the next grid launch
(griddepcontrol.launch_dependents); a kernel launched without the attribute (cuBLAS, torch ops) is ordered as usual.
The order of the stream is kept: each waiting kernel waits for its predecessor, which waited for its own. Measured on
an H200 (2026-12-03, llama-2-13b e3m2, one process, interleaved): 4.02 -> 3.75 ms per decode step at batch 1, 4.77 ->
4.54 at batch 8 (bench/pdl_ab.py; bench/results/device-h200-2026-12-03c/early/).

On by default; FP6LLM_PDL=0 in the environment, or ``programmatic_launch(False)`` around work, turns it off.
``enabled(device)`` is what a launcher asks: on, an NVIDIA device of compute capability 9.0 or newer with a CUDA 12.3
or newer driver (MIN_DRIVER), and not the Triton interpreter. A Triton kernel's side is ``pdl.wait_for_previous``
(kernels/pdl.py; this module needs no Triton, the engine imports it). Within ``static_weights()`` the small-M kernel
also loads its first weight tile before it waits, so that the weight stream of one layer runs on into the next.

``direct(*tensors)`` is the other launch policy here: whether an op of ours calls its CUDA kernel's function itself
rather than through its torch custom op (eager mode, plain CUDA tensors).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os

import torch
from torch import nn

try:
    from torch.utils._python_dispatch import _get_current_dispatch_mode
except ImportError:  # a torch without it: every call goes through the custom ops
    def _get_current_dispatch_mode():
        return True

PDL = os.environ.get("FP6LLM_PDL", "1") != "0"  # programmatic_launch() sets it
STATIC_WEIGHTS = False  # static_weights() sets it


@contextlib.contextmanager
def programmatic_launch(on: bool = True):
    """Within: the project's kernels launch with programmatic dependent launch where the device allows (enabled), or,
    with on False, without it."""
    global PDL
    previous, PDL = PDL, on
    try:
        yield
    finally:
        PDL = previous


@contextlib.contextmanager
def static_weights():
    """Within: the caller promises that no kernel of the stream writes a layer's weights (packed planes, scales), so
    a kernel launched early may read them before it waits for the previous one (an engine's steps)."""
    global STATIC_WEIGHTS
    previous, STATIC_WEIGHTS = STATIC_WEIGHTS, True
    try:
        yield
    finally:
        STATIC_WEIGHTS = previous


def weights_static() -> bool:
    return STATIC_WEIGHTS


MIN_DRIVER = 12030  # CUDA 12.3: the first driver whose graph capture keeps programmatic dependencies


@functools.lru_cache(maxsize=None)
def driver_version() -> int:
    """The CUDA driver's version (12030 for 12.3; cuDriverGetVersion), 0 where it cannot be read."""
    try:
        version = ctypes.c_int(0)
        library = torch.cuda._utils._get_gpu_runtime_library()
        return version.value if library.cuDriverGetVersion(ctypes.byref(version)) == 0 else 0
    except Exception:  # no driver library, or ROCm's without the call
        return 0


@functools.lru_cache(maxsize=None)
def _supported(index: int) -> bool:
    """Whether device ``index`` takes programmatic dependent launch: an NVIDIA GPU of compute capability 9.0 or newer
    (not ROCm's, whose capabilities also reach 9) on a driver of at least MIN_DRIVER."""
    return (not torch.version.hip and torch.cuda.get_device_capability(index) >= (9, 0)
            and driver_version() >= MIN_DRIVER)


def enabled(device) -> bool:
    """Whether a kernel on ``device`` launches with programmatic dependent launch now."""
    if not PDL:
        return False
    device = torch.device(device)
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _supported(device.index if device.index is not None else torch.cuda.current_device())


def triton_options(device) -> dict:
    """The keyword arguments of a Triton launch of a kernel with a ``PDL`` constexpr: PDL and, where on, launch_pdl
    (Triton's option for the launch attribute)."""
    return {"PDL": True, "launch_pdl": True} if enabled(device) else {"PDL": False}



_PLAIN = (torch.Tensor, nn.Parameter)


def direct(*tensors) -> bool:
    """Whether an op of ours (decoder_ops, models/attention.py, ops.fpx_linear) calls its CUDA kernel's function
    directly instead of through its torch custom op: in eager mode with every given tensor (None skipped) a plain CUDA
    tensor or parameter; not under torch.compile (whose graphs need the op), not inside a torch function or dispatch
    mode (a FakeTensorMode, a FLOP counter), not for a tensor subclass, not while autograd records a tensor that
    requires grad. The kernel that runs is the op's CUDA
    implementation either way; the op's dispatch costs about 33 us of host time per call on the H200 machine
    (bench/host_overhead.py, 2026-12-04), which an eager prefill pays at every op of every layer."""
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled() or \
            _get_current_dispatch_mode() is not None:
        return False
    if not all(t is None or (type(t) in _PLAIN and t.is_cuda) for t in tensors):
        return False
    # with autograd recording, the op (whose backward raises: none is registered) rather than outputs that would
    # silently carry no gradient
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
