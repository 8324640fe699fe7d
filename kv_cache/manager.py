"""Per-request block tables over the block pool: prefix-cache hits, slot allocation, release."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kv_cache.block_pool import NULL_BLOCK_ID, Block, BlockPool, hash_block_tokens


@dataclass(slots=True)
class PrefixHit:
    blocks: list[Block]
    num_free_touched: int  # hit blocks that sit in the free queue and would leave it

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self._tables: dict[str, list[Block]] = {}
        self._hashes: dict[str, list[bytes]] = {}

    # -- prefix cache -------------------------------------------------------------------------

    def find_prefix(self, request_id: str, token_ids: Sequence[int], salt: bytes | None = None) -> PrefixHit:
        """Longest chain of cached full blocks; never covers the last token, which needs logits. `salt` starts
        the hash chain: requests whose KV differs for the same tokens (another attention backend) never share."""
        if not self.pool.enable_caching:
            return PrefixHit([], 0)
        hashes = self._block_hashes(request_id, token_ids, salt)
        max_blocks = (len(token_ids) - 1) // self.block_size
        blocks: list[Block] = []
        for i in range(max_blocks):
            tokens = token_ids[i * self.block_size : (i + 1) * self.block_size]
            block = self.pool.lookup(hashes[i], tokens)
            if block is None:
                break
            blocks.append(block)
        return PrefixHit(blocks, sum(1 for b in blocks if b.ref_count == 0))

    def can_admit(self, hit: PrefixHit, num_tokens: int) -> bool:
        """Whether `num_tokens` tokens (hit included) fit once the hit blocks are taken."""
        needed = -(-num_tokens // self.block_size) - hit.num_blocks
        return needed <= self.pool.num_free - hit.num_free_touched

    def admit(self, request_id: str, hit: PrefixHit, num_prompt_tokens: int) -> int:
        """Start a request's table with its prefix hit; returns the number of cached tokens."""
        for block in hit.blocks:
            self.pool.touch(block)
        self._tables[request_id] = list(hit.blocks)
        cached = hit.num_blocks * self.block_size
        if self.pool.enable_caching:
            self.pool.record_prefix_lookup(num_prompt_tokens, cached)
        return cached

    # -- slots ----------------------------------------------------------------------------------

    def num_blocks_needed(self, request_id: str, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(self._tables.get(request_id, ())))

    def allocate_slots(self, request_id: str, num_tokens: int) -> bool:
        """Grow the table to hold `num_tokens` tokens; False (nothing taken) when the pool is short."""
        need = self.num_blocks_needed(request_id, num_tokens)
        if need > self.pool.num_free:
            return False
        if need:
            self._tables.setdefault(request_id, []).extend(self.pool.allocate(need))
        return True

    def allocate_at(self, request_id: str, num_tokens: int, block_indices: Iterable[int]) -> bool:
        """Grow the table to cover `num_tokens` tokens with null blocks, then back the given entries with real
        blocks (a rank that holds only some of a sequence's positions); False (nothing taken) when short."""
        table = self._tables.setdefault(request_id, [])
        table.extend([self.pool.blocks[NULL_BLOCK_ID]] * max(0, -(-num_tokens // self.block_size) - len(table)))
        missing = sorted({i for i in block_indices if table[i].block_id == NULL_BLOCK_ID})
        if len(missing) > self.pool.num_free:
            return False
        for i, block in zip(missing, self.pool.allocate(len(missing))):
            table[i] = block
        return True

    def cache_full_blocks(self, request_id: str, token_ids: Sequence[int], num_computed: int,
                          salt: bytes | None = None) -> None:
        """Publish every full, computed block of the request to the prefix cache."""
        if not self.pool.enable_caching:
            return
        table = self._tables[request_id]
        hashes = self._block_hashes(request_id, token_ids[:num_computed], salt)
        for i in range(num_computed // self.block_size):
            block = table[i]
            if block.block_id != NULL_BLOCK_ID and block.block_hash is None:
                self.pool.cache_block(block, hashes[i], token_ids[i * self.block_size : (i + 1) * self.block_size])

    def free(self, request_id: str) -> None:
        table = self._tables.pop(request_id, [])
        self._hashes.pop(request_id, None)
        self.pool.free(list(reversed(table)))

    def release(self, request_id: str, block_indices: Sequence[int]) -> int:
        """Give back blocks a backend will never read again; the table keeps the null block there."""
        table = self._tables[request_id]
        released = [table[i] for i in block_indices if table[i].block_id != NULL_BLOCK_ID]
        for i in block_indices:
            table[i] = self.pool.blocks[NULL_BLOCK_ID]
        self.pool.free(released)
        return len(released)

    def block_table(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._tables.get(request_id, ())]

    def num_held_blocks(self, request_id: str) -> int:
        return sum(1 for b in self._tables.get(request_id, ()) if b.block_id != NULL_BLOCK_ID)

    # -- internals ------------------------------------------------------------------------------

    def _block_hashes(self, request_id: str, token_ids: Sequence[int], salt: bytes | None) -> list[bytes]:
        hashes = self._hashes.setdefault(request_id, [])
        for i in range(len(hashes), len(token_ids) // self.block_size):
            parent = hashes[i - 1] if i else salt
            hashes.append(hash_block_tokens(parent, token_ids[i * self.block_size : (i + 1) * self.block_size]))
        return hashes
