"""The processes of tensor parallelism: joining torchrun's process group, a seed shared by the ranks, and the gloo
group that carries the engine calls from rank 0 to the others (engine/mirror.py).

How a model is split over the ranks is the models' business (models/parallel.py); here is what every process of a
``torchrun --nproc-per-node N -m fp6llm generate|bench|serve ... --tp N`` run does before and around its model:

    with process_group(n, device) as (tp, device):     # tp: this rank (None for n = 1), device: its GPU
        engine = load(..., tp=tp)
        seed = shared_seed(tp, seed)                   # one sampling seed for every rank
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from ..models.parallel import TensorParallel

# NVLink multicast (NVLS, symmetric-memory multicast) stays off on the multi-GPU machines: set in every process
# before its process group starts, unless the environment already says otherwise.
NVLINK_MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
CONTROL_TIMEOUT = datetime.timedelta(days=365)  # a follower may wait this long for the server's next call
# Set once this process has left a process group. Interpreter teardown after that can abort in gloo's threads
# ("terminate called without an active exception", SIGABRT: 2 of 10 `torchrun ... generate --tp 2` runs on a CPU,
# 2026-12-02, after the output was printed), so the CLI leaves such a process through os._exit (cli.main).
left_group = False


@contextlib.contextmanager
def process_group(degree: int, device=None) -> Iterator[tuple]:
    """(TensorParallel or None, device) of this process as one of ``degree`` ranks started by torchrun.

    degree 1 yields (None, device): the single-process path, no torch.distributed at all. Otherwise the process joins
    the group torchrun describes (RANK, LOCAL_RANK, WORLD_SIZE; NCCL on CUDA, gloo on CPU) with NVLink multicast
    off (NVLINK_MULTICAST_OFF, unless already set), takes GPU LOCAL_RANK on CUDA, and leaves the group on exit.
    Raises ValueError when torchrun did not start it or started another number of processes.
    """
    launched = all(name in os.environ for name in TORCHRUN_VARIABLES)
    processes = int(os.environ["WORLD_SIZE"]) if launched else 1
    if not isinstance(degree, int) or degree < 1:
        raise ValueError(f"--tp must be a positive int, got {degree!r}")
    if degree > 1 and not launched:
        raise ValueError(f"--tp {degree} needs one process per rank, started by torchrun: torchrun --nproc-per-node "
                         f"{degree} -m fp6llm ... --tp {degree}")
    if processes != degree:
        raise ValueError(f"--tp {degree} does not match the {processes} processes torchrun started (WORLD_SIZE); "
                         f"use torchrun --nproc-per-node {degree} ... --tp {degree}")
    if degree == 1:
        yield None, device
        return
    for name, value in NVLINK_MULTICAST_OFF.items():
        os.environ.setdefault(name, value)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"rank {local_rank} of this machine has no GPU: {torch.cuda.device_count()} visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    try:
        yield TensorParallel(dist.get_rank(), dist.get_world_size()), device
        if started:
            dist.barrier()  # no rank leaves while another may still talk to it
    finally:
        if started:
            global left_group
            dist.destroy_process_group()
            left_group = True


def broadcast_object(message, group=None):
    """Rank 0's ``message`` (any picklable value) on every rank of ``group``; a collective: every rank calls it (the
    others' message is ignored)."""
    box = [message]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def shared_seed(tp: TensorParallel, seed: Optional[int] = None) -> int:
    """``seed``, or rank 0's fresh random one on every rank: sampling must draw the same tokens on every rank."""
    if seed is not None:
        return seed
    return broadcast_object(random.SystemRandom().randrange(2**62), tp.group)


def control_group():
    """A gloo process group over every rank for rank 0's engine calls (engine/mirror.py), with a long timeout: an
    idle server keeps its followers waiting in a CPU receive, not in an NCCL collective that would time out. Call on
    every rank (a collective)."""
    return dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
