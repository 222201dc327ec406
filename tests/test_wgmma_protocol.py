"""A model of the wgmma kernel's bulk path (kernels/cuda/fpx_wgmma.cu, CLUSTER >= 1), run under random schedules:
the stage / parity arithmetic of its mbarrier ring, with the PTX semantics of mbarrier (arrival count, tx-count,
phase parity) and of multicast bulk copies (delivered later, to every CTA of the cluster, completing bytes on each
one's barrier at the same offset). It checks what the kernel relies on and no GPU can be asked here: no deadlock,
each warp reads tile j's bytes (every CTA's slice) when it waits for tile j, and no copy lands in a stage a warp of
any CTA has not released. The formulas are the kernel's (produce_x, STEP, RELEASE); change both together.
"""

import random

import pytest


class MBarrier:
    """mbarrier: a phase completes when its pending arrivals reach 0 and its tx-count is 0 (it may go negative
    first: bytes that land before the expect-tx); then the next phase starts with the init count."""

    def __init__(self, count: int):
        self.count, self.pending, self.tx, self.phase = count, count, 0, 0

    def _maybe_complete(self):
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending = self.count

    def arrive(self, expect_tx: int = 0):
        assert self.pending > 0
        self.tx += expect_tx
        self.pending -= 1
        self._maybe_complete()

    def complete_tx(self, nbytes: int):
        self.tx -= nbytes
        assert self.tx >= -(2 ** 20 - 1)
        self._maybe_complete()

    def done(self, parity: int) -> bool:  # try_wait.parity: the phase of this parity has completed
        return (self.phase & 1) != parity


def run_model(cluster: int, warps: int, x_ahead: int, nk: int, seed: int, slack: int = 1):
    stages = x_ahead + slack  # X_STAGES
    tile_bytes = 256 * cluster  # any multiple of the cluster: the slices are tile_bytes / cluster
    full = [[MBarrier(1) for _ in range(stages)] for _ in range(cluster)]
    empty = [[MBarrier(warps * cluster) for _ in range(stages)] for _ in range(cluster)]
    smem = [[[None] * cluster for _ in range(stages)] for _ in range(cluster)]  # [cta][stage][slice] = tile
    released = [[-1] * warps for _ in range(cluster)]  # the last tile each warp released
    deliveries = []  # copies in flight: (target cta, stage, slice, tile)
    rng = random.Random(seed)

    def produce(q, j):  # produce_x(j) in CTA q's thread 0
        s = j % stages
        if j >= stages:
            yield lambda: empty[q][s].done(((j // stages) - 1) & 1)
        full[q][s].arrive(expect_tx=tile_bytes)
        for r in range(cluster):  # the multicast: slice q of tile j into stage s of every CTA
            deliveries.append((r, s, q, j))

    def warp(q, w):
        if w == 0:
            for j in range(min(x_ahead, nk)):
                yield from produce(q, j)
        for j in range(nk):
            s = j % stages
            if w == 0 and j + x_ahead < nk:
                yield from produce(q, j + x_ahead)
            yield lambda: full[q][s].done((j // stages) & 1)
            assert smem[q][s] == [j] * cluster, (q, w, j, smem[q][s])  # the wgmma read tile j, whole
            yield None  # the wgmma and their wait
            for r in range(cluster):  # RELEASE: lane r of the warp arrives at CTA r's empty barrier
                empty[r][s].arrive()
            released[q][w] = j

    agents = [warp(q, w) for q in range(cluster) for w in range(warps)]
    waiting = {i: None for i in range(len(agents))}  # agent -> the condition it waits for (None: runnable)
    while agents and any(a is not None for a in agents):
        runnable = [i for i, a in enumerate(agents) if a is not None and (waiting[i] is None or waiting[i]())]
        choices = [("agent", i) for i in runnable] + [("copy", k) for k in range(len(deliveries))]
        assert choices, "deadlock: every warp waits and no copy is in flight"
        kind, i = rng.choice(choices)
        if kind == "copy":
            r, s, q, j = deliveries.pop(i)
            if j >= stages:  # the stage's previous tile was released by every warp of the target CTA
                assert all(t >= j - stages for t in released[r]), (r, s, j, released[r])
            smem[r][s][q] = j
            full[r][s].complete_tx(tile_bytes // cluster)
            continue
        try:
            waiting[i] = next(agents[i])
        except StopIteration:
            agents[i] = None
    assert not deliveries
    assert all(t == nk - 1 for row in released for t in row)


@pytest.mark.parametrize("cluster", [1, 2, 4, 8])
@pytest.mark.parametrize("x_ahead", [1, 2, 3])
def test_bulk_x_ring_never_deadlocks_and_reads_the_right_tiles(cluster, x_ahead):
    for nk in (1, 2, x_ahead + 1, 7, 12):
        for seed in range(6):
            run_model(cluster, 4 if seed % 2 else 8, x_ahead, nk, seed)


def test_model_catches_a_ring_without_a_spare_stage():
    """The model is not vacuous: with as many stages as tiles in flight (no stage for the tile being read), a
    copy lands in a stage still being read, or a warp reads the wrong tile."""
    with pytest.raises(AssertionError):
        for seed in range(40):
            run_model(2, 4, 2, 9, seed, slack=0)
