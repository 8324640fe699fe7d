"""Block pool, prefix cache, block release and side tables."""

from __future__ import annotations

import pytest
import torch

from attention_backends.kernels.paged import take_blocks, write_kv
from kv_cache import NULL_BLOCK_ID, BlockPool, KVCacheManager, KVSpec, PagedKVCache, hash_block_tokens

BS = 4


def _manager(num_blocks: int = 9) -> KVCacheManager:
    return KVCacheManager(BlockPool(num_blocks), BS)


def _run(mgr: KVCacheManager, rid: str, tokens: list[int]) -> int:
    """Admit, allocate and 'compute' a whole prompt; returns the cached tokens found."""
    hit = mgr.find_prefix(rid, tokens)
    assert mgr.can_admit(hit, len(tokens))
    cached = mgr.admit(rid, hit, len(tokens))
    assert mgr.allocate_slots(rid, len(tokens))
    mgr.cache_full_blocks(rid, tokens, len(tokens))
    return cached


def test_hash_chain_names_the_whole_prefix():
    a = hash_block_tokens(None, [1, 2, 3, 4])
    assert hash_block_tokens(a, [5, 6, 7, 8]) != hash_block_tokens(hash_block_tokens(None, [0, 2, 3, 4]), [5, 6, 7, 8])
    assert hash_block_tokens(None, [1, 2, 3, 4]) == a


def test_null_block_is_never_handed_out():
    pool = BlockPool(5)
    assert NULL_BLOCK_ID not in [b.block_id for b in pool.allocate(4)]
    with pytest.raises(MemoryError):
        pool.allocate(1)


def test_prefix_hit_never_covers_last_token_and_counts():
    mgr = _manager()
    tokens = list(range(12))  # exactly 3 blocks
    assert _run(mgr, "a", tokens) == 0
    assert _run(mgr, "b", tokens) == 8  # the third block holds the last token: recomputed
    assert mgr.block_table("a")[:2] == mgr.block_table("b")[:2]
    assert mgr.pool.blocks[mgr.block_table("a")[0]].ref_count == 2
    mgr.free("a")
    mgr.free("b")
    usage = mgr.pool.usage()
    assert usage.used == 0 and usage.cached == 3 and usage.prefix_hits == 8 and usage.prefix_queries == 24


def test_token_equality_guards_a_hash_hit():
    mgr = _manager()
    _run(mgr, "a", list(range(9)))
    block = mgr.pool.blocks[mgr.block_table("a")[0]]
    assert mgr.pool.lookup(block.block_hash, [0, 1, 2, 99]) is None
    assert mgr.pool.lookup(block.block_hash, [0, 1, 2, 3]) is block


def test_lru_evicts_unhashed_first_then_oldest_cached():
    mgr = _manager(num_blocks=7)  # 6 usable
    _run(mgr, "old", list(range(9)))  # 2 full cached blocks + 1 partial
    _run(mgr, "new", list(range(100, 109)))
    mgr.free("old")
    mgr.free("new")
    # The partial (unhashed) blocks go first; then the older request's chain, tail first.
    old_table = [b for b in mgr.pool.blocks if b.token_ids and b.token_ids[0] < 100]
    taken = mgr.pool.allocate(3)
    assert {b.block_hash for b in taken} == {None}
    assert sum(1 for b in old_table if b.block_hash is not None) == 1
    # The newer chain survives intact.
    assert _run(mgr, "again", list(range(100, 109))) == 8


def test_allocate_slots_fails_cleanly_when_short():
    mgr = _manager(num_blocks=4)
    assert mgr.allocate_slots("a", 8)
    assert not mgr.allocate_slots("b", 8)
    assert mgr.block_table("b") == [] and mgr.pool.num_free == 1


def test_release_keeps_null_block_in_table():
    mgr = _manager()
    _run(mgr, "a", list(range(14)))
    held = mgr.num_held_blocks("a")
    assert mgr.release("a", [0, 1]) == 2
    assert mgr.block_table("a")[:2] == [NULL_BLOCK_ID, NULL_BLOCK_ID]
    assert mgr.num_held_blocks("a") == held - 2
    assert mgr.release("a", [0]) == 0  # releasing twice is harmless
    mgr.free("a")
    assert mgr.pool.usage().used == 0


def test_side_table_is_cleared_with_its_block():
    spec = KVSpec(num_layers=2, num_kv_heads=1, head_dim=4, block_size=BS)
    kv = PagedKVCache(spec, 5)
    pool = BlockPool(5, enable_caching=False)
    kv.attach(pool)
    table = kv.register_side_table("summary", (4,))
    assert kv.register_side_table("summary", (4,)) is table
    with pytest.raises(ValueError):
        kv.register_side_table("summary", (8,))
    (block,) = pool.allocate(1)
    table.data[:, block.block_id] = 1.0
    table.filled[block.block_id] = True
    pool.free([block])
    assert not table.filled[block.block_id]


def test_kv_write_and_gather_roundtrip():
    spec = KVSpec(num_layers=1, num_kv_heads=2, head_dim=3, block_size=BS)
    kv = PagedKVCache(spec, 4)
    k, v = torch.randn(8, 2, 3), torch.randn(8, 2, 3)
    write_kv(kv.k[0], kv.v[0], k, v, torch.tensor([4, 5, 6, 7, 12, 13, 14, 15]))  # blocks 1 and 3
    for table in ([1, 3], [3, 1], [1]):  # scattered blocks are copied, consecutive ones viewed
        gk, gv = (take_blocks(c, torch.tensor(table)) for c in (kv.k[0], kv.v[0]))
        expect = torch.cat([k[:4] if b == 1 else k[4:] for b in table]).view(len(table), BS, 2, 3)
        assert torch.equal(gk, expect) and gv.shape == expect.shape
    assert spec.block_bytes == 2 * BS * 2 * 3 * 4
