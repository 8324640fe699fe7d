"""Paged KV cache: block pool with prefix caching, per-request block tables, K/V tensors and side tables."""

from kv_cache.block_pool import NULL_BLOCK_ID, Block, BlockPool, PoolUsage, hash_block_tokens
from kv_cache.manager import KVCacheManager, PrefixHit
from kv_cache.paged_kv import KVSpec, PagedKVCache, SideTable

__all__ = [
    "NULL_BLOCK_ID",
    "Block",
    "BlockPool",
    "KVCacheManager",
    "KVSpec",
    "PagedKVCache",
    "PoolUsage",
    "PrefixHit",
    "SideTable",
    "hash_block_tokens",
]
