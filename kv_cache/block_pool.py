"""Block pool: allocation, ref counts, prefix-cache hashes and LRU eviction of KV blocks.

Block 0 is the null block: it is never handed out and stands in block tables for blocks a
backend released. Free blocks live in one ordered queue that is also the eviction order:
blocks without a hash go to the front (reused first), hashed ones to the back (evicted last),
and a hashed block keeps its hash until it is popped for new content (lazy eviction).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

NULL_BLOCK_ID = 0
# Root of every hash chain; fixed so hashes are reproducible across processes.
ROOT_HASH = hashlib.sha256(b"longserve-prefix-root").digest()


def hash_block_tokens(parent_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    """SHA-256 over the parent's hash and this block's tokens: a block's hash names its whole prefix."""
    h = hashlib.sha256(parent_hash or ROOT_HASH)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None
    token_ids: tuple[int, ...] = ()


@dataclass(slots=True)
class PoolUsage:
    num_blocks: int  # usable blocks, the null block excluded
    used: int
    free: int
    cached: int  # free blocks that still hold a prefix-cache entry
    prefix_queries: int  # prompt tokens looked up in the prefix cache
    prefix_hits: int  # of which were found

    @property
    def usage(self) -> float:
        return self.used / self.num_blocks if self.num_blocks else 0.0


@dataclass
class BlockPool:
    num_blocks: int
    enable_caching: bool = True
    blocks: list[Block] = field(init=False)
    _free: OrderedDict[int, None] = field(init=False)
    _cached: dict[bytes, int] = field(init=False)
    # Called with a block id whenever that block's content stops being meaningful.
    _on_reset: list[Callable[[int], None]] = field(init=False, default_factory=list)
    prefix_queries: int = 0
    prefix_hits: int = 0

    def __post_init__(self) -> None:
        if self.num_blocks < 2:
            raise ValueError(f"the KV pool needs at least 2 blocks (one is the null block), got {self.num_blocks}")
        self.blocks = [Block(i) for i in range(self.num_blocks)]
        self._free = OrderedDict((i, None) for i in range(1, self.num_blocks))
        self._cached = {}

    def add_reset_hook(self, hook: Callable[[int], None]) -> None:
        self._on_reset.append(hook)

    # -- allocation -------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[Block]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                self._evict(block)
            block.ref_count = 1
            out.append(block)
        return out

    def free(self, blocks: Sequence[Block]) -> None:
        """Drop one reference from each block; pass a sequence's blocks tail first so its tail is evicted first."""
        for block in blocks:
            if block.block_id == NULL_BLOCK_ID:
                continue
            if block.ref_count <= 0:
                raise RuntimeError(f"double free of KV block {block.block_id}")
            block.ref_count -= 1
            if block.ref_count > 0:
                continue
            if block.block_hash is None:
                self._reset(block.block_id)
                self._free[block.block_id] = None
                self._free.move_to_end(block.block_id, last=False)
            else:
                self._free[block.block_id] = None

    # -- prefix cache -----------------------------------------------------------------------

    def lookup(self, block_hash: bytes, token_ids: Sequence[int]) -> Block | None:
        """A cached block with this hash and these exact tokens (a hash collision is a miss)."""
        block_id = self._cached.get(block_hash)
        if block_id is None:
            return None
        block = self.blocks[block_id]
        return block if block.token_ids == tuple(token_ids) else None

    def touch(self, block: Block) -> None:
        """Take a reference on a cache hit, reviving the block if it was free."""
        if block.ref_count == 0:
            del self._free[block.block_id]
        block.ref_count += 1

    def cache_block(self, block: Block, block_hash: bytes, token_ids: Sequence[int]) -> None:
        # A duplicate of a block cached earlier stays unhashed (reused first once free); tables never change.
        if not self.enable_caching or block.block_hash is not None or block_hash in self._cached:
            return
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self._cached[block_hash] = block.block_id

    def record_prefix_lookup(self, queried_tokens: int, hit_tokens: int) -> None:
        self.prefix_queries += queried_tokens
        self.prefix_hits += hit_tokens

    def reset_prefix_cache(self) -> None:
        for block_id in list(self._free):
            block = self.blocks[block_id]
            if block.block_hash is not None:
                self._evict(block)

    # -- figures ----------------------------------------------------------------------------

    def usage(self) -> PoolUsage:
        free = len(self._free)
        cached = sum(1 for b in self._free if self.blocks[b].block_hash is not None)
        total = self.num_blocks - 1
        return PoolUsage(total, total - free, free, cached, self.prefix_queries, self.prefix_hits)

    # -- internals --------------------------------------------------------------------------

    def _evict(self, block: Block) -> None:
        del self._cached[block.block_hash]
        block.block_hash = None
        block.token_ids = ()
        self._reset(block.block_id)

    def _reset(self, block_id: int) -> None:
        for hook in self._on_reset:
            hook(block_id)
