"""The KV-cache blocks: which are free, which are shared, and which hold a known prefix (prefix caching).

Block NULL_BLOCK is never handed out: padding tokens write to it and unused block-table entries point at it.

A block is referenced by the requests whose block tables hold it. A full block whose tokens are all computed can be
registered under the hash of its tokens and of everything before them (``prefix_hashes``); a later request whose
prompt starts with the same tokens shares it instead of computing it again (``lookup`` / ``share``). A block
nobody references goes back to the free list but keeps its hash, so it can still be shared until ``allocate``
hands it out for new tokens (oldest freed first) and forgets the hash. The order of everything follows the order of
the calls alone (no clocks, Python's int-tuple hashes are the same in every process), so every tensor-parallel rank
makes the same block tables.
"""

from __future__ import annotations

from typing import Optional, Sequence

from ..models.attention import NULL_BLOCK


class OutOfBlocks(Exception):
    """Fewer free blocks than asked for (the scheduler preempts or waits; never seen outside the engine)."""


def prefix_hashes(tokens: Sequence[int], block_size: int, previous: Optional[int] = None) -> list:
    """Hashes of the consecutive full blocks of ``tokens``, each over its own tokens and the hash before it
    (``previous``: that of the block before tokens[0]), so that equal hashes mean equal prefixes."""
    hashes = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        previous = hash((previous, tuple(tokens[start:start + block_size])))
        hashes.append(previous)
    return hashes


class BlockAllocator:
    """num_blocks blocks, NULL_BLOCK excluded, with reference counts and a prefix-hash -> block map."""

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block {NULL_BLOCK} is scratch), got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = dict.fromkeys(b for b in range(num_blocks) if b != NULL_BLOCK)  # insertion-ordered set
        self._refs: dict = {}  # block -> requests holding it (>= 1)
        self._cached: dict = {}  # prefix hash -> block
        self._hash_of: dict = {}  # block -> its prefix hash

    @property
    def num_free(self) -> int:
        """Blocks nobody references (some still shareable by their hash)."""
        return len(self._free)

    def allocate(self, count: int) -> list:
        """``count`` free block ids for new tokens (their old hashes forgotten); raises OutOfBlocks (taking none)
        when fewer are free."""
        if count > len(self._free):
            raise OutOfBlocks(f"{count} blocks asked for, {len(self._free)} free")
        blocks = []
        for _ in range(count):
            block = next(iter(self._free))
            del self._free[block]
            old = self._hash_of.pop(block, None)
            if old is not None:
                del self._cached[old]
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: list) -> None:
        """Drop one reference to each block; raises ValueError for one that is not allocated (a double free)."""
        for block in blocks:
            if block not in self._refs:
                raise ValueError(f"block {block} is not allocated")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                del self._refs[block]
                self._free[block] = None

    def is_free(self, block: int) -> bool:
        return block in self._free

    def lookup(self, hashes: list) -> list:
        """The blocks registered under the longest run of ``hashes`` from the first (takes nothing)."""
        blocks = []
        for value in hashes:
            block = self._cached.get(value)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def share(self, blocks: list) -> None:
        """Add a reference to each of ``blocks`` (from ``lookup``), taking the unreferenced ones off the free list."""
        for block in blocks:
            if block in self._free:
                del self._free[block]
            self._refs[block] = self._refs.get(block, 0) + 1

    def register(self, block: int, value: int) -> None:
        """Record that ``block`` (allocated, full, computed) holds the prefix of hash ``value``; a prefix already
        held by another block keeps that one."""
        if value not in self._cached and block not in self._hash_of:
            self._cached[value] = block
            self._hash_of[block] = value
