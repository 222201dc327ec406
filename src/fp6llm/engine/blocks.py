"""The free list of KV-cache blocks: which blocks of the paged cache (models/attention.py) are free.

Block NULL_BLOCK is never handed out: padding tokens write to it and unused block-table entries point at it.
Blocks are handed out lowest first and a freed block goes back to the end of the list, so that the order of
allocations (and so every rank's block tables under tensor parallelism) follows the order of the calls alone.
"""

from __future__ import annotations

import collections

from ..models.attention import NULL_BLOCK


class OutOfBlocks(Exception):
    """Fewer free blocks than asked for (the scheduler preempts or waits; never seen outside the engine)."""


class BlockAllocator:
    """num_blocks blocks, NULL_BLOCK excluded: allocate(n) -> block ids, free(ids) gives them back."""

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block {NULL_BLOCK} is scratch), got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = collections.deque(b for b in range(num_blocks) if b != NULL_BLOCK)
        self._used: set = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Blocks that sequences can hold (all but NULL_BLOCK)."""
        return self.num_blocks - 1

    def allocate(self, count: int) -> list:
        """``count`` free block ids; raises OutOfBlocks (taking none) when fewer are free."""
        if count > len(self._free):
            raise OutOfBlocks(f"{count} blocks asked for, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(count)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: list) -> None:
        """Give blocks back; raises ValueError for one that is not allocated (a double free)."""
        for block in blocks:
            if block not in self._used:
                raise ValueError(f"block {block} is not allocated")
            self._used.remove(block)
            self._free.append(block)
