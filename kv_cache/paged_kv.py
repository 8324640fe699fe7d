"""Paged K/V tensors per layer, and the per-block side tables that sparse backends register.

Layout per layer: `[num_blocks, block_size, num_kv_heads, head_dim]`, KV heads unrepeated. A slot
is `block_id * block_size + offset`; `slot_mapping` says where each new token's K/V goes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from attention_backends.kernels.huge_pages import zeros
from kv_cache.block_pool import BlockPool


@dataclass(frozen=True, slots=True)
class KVSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int = 16
    dtype: torch.dtype = torch.float32

    @property
    def block_bytes(self) -> int:
        """Bytes one block takes across all layers, K and V."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * itemsize

    def blocks_for_memory(self, gib: float) -> int:
        return int(gib * (1 << 30)) // self.block_bytes


@dataclass
class SideTable:
    """Per-block data a backend derives from a block's keys (block summaries, low-rank keys, ...).

    `data[layer, block_id]` is meaningful only while `filled[block_id]`; the pool clears the flag
    the moment the block's content is dropped, so a reused block never shows stale data.
    """

    name: str
    data: torch.Tensor  # [num_layers, num_blocks, *shape]
    filled: torch.Tensor  # [num_blocks] bool

    def clear(self, block_id: int) -> None:
        self.filled[block_id] = False


class PagedKVCache:
    def __init__(self, spec: KVSpec, num_blocks: int, device: torch.device | str = "cpu") -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        self.device = torch.device(device)
        shape = (spec.num_layers, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        # One tensor per K and V, viewed per layer: a backend that packs tokens across layers (TCA) can then
        # address any layer's slots with one index, `(layer * num_blocks + block) * block_size + offset`. On 2 MiB
        # pages where the OS has them: decodes read rows scattered over the whole pool.
        self.k_all = zeros(shape, spec.dtype, self.device)
        self.v_all = zeros(shape, spec.dtype, self.device)
        self.k = list(self.k_all.unbind(0))
        self.v = list(self.v_all.unbind(0))
        # Replaced, never changed in place: the engine thread may iterate it while a request thread registers a
        # table (a backend built on first use), and the lock keeps two such threads from making one table twice.
        self.side_tables: dict[str, SideTable] = {}
        self._register_lock = threading.Lock()

    def attach(self, pool: BlockPool) -> None:
        if pool.num_blocks != self.num_blocks:
            raise ValueError("pool and KV tensors disagree on the number of blocks")
        pool.add_reset_hook(self._on_block_reset)

    def register_side_table(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> SideTable:
        """Create (or return the existing) side table `name` with `shape` per (layer, block)."""
        full = (self.spec.num_layers, self.num_blocks, *shape)
        with self._register_lock:
            table = self.side_tables.get(name)
            if table is not None:
                if tuple(table.data.shape) != full or table.data.dtype != dtype:
                    raise ValueError(f"side table {name!r} already registered with another shape or dtype")
                return table
            with torch.inference_mode(False):  # backends register lazily, inside steps; the pool clears flags outside
                table = SideTable(
                    name,
                    torch.zeros(full, dtype=dtype, device=self.device),
                    torch.zeros(self.num_blocks, dtype=torch.bool),
                )
            self.side_tables = {**self.side_tables, name: table}
            return table

    def _on_block_reset(self, block_id: int) -> None:
        for table in self.side_tables.values():
            table.clear(block_id)
