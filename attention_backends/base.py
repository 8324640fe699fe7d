"""The backend contract: `prepare(batch)` once per step, `forward(layer, q, k, v, batch, scale)` per layer.

What a backend can rely on, and must keep:

- **Tensors.** `forward` gets this step's queries `q` `[H_q, T, D]` and fresh keys and values `k`, `v`
  `[H_kv, T, D]` (post-RoPE, KV heads unrepeated), T counting the backend's tokens in packed order: sequence
  `s` holds rows `[s.query_start, s.query_start + s.query_len)`. It returns `[H_q, T, D]`. The paged cache is
  `self.kv`: per layer `kv.k[layer]`, `kv.v[layer]` `[num_blocks, block_size, H_kv, D]`; a slot is
  `block * block_size + offset`, and `batch.slot_mapping` `[T]` says where each fresh token goes.
- **Storing.** `forward` stores the fresh K/V itself (`store_kv`, or whatever it keeps instead: Loki stores rotated
  keys), before it reads the cache; nothing else writes them.
- **Metadata.** `prepare` returns the step's metadata, one dataclass per backend, which the runner puts in
  `batch.meta` for `forward` to read. It runs on the engine thread before the first layer and must be
  idempotent: a step that fails is rerun sequence by sequence, so `prepare` (and `select_rows`) may see the same
  sequence again, and must change nothing that outlives the step. State is committed after the step, in
  `blocks_to_release`.
- **Per-sequence state.** `new_state(params)` makes a sequence's state object (None: the backend keeps none);
  `SeqStep.state` is that object in every step. The engine makes it when the sequence first runs and again after a
  preemption (the recompute starts from nothing); it never changes the object itself.
- **After the step.** `blocks_to_release(step)` runs once per sequence per step that ran (also when this rank ran
  none of its rows), after every layer, with the same `SeqStep` the step ran: the cache now holds `step.end`
  tokens. It may update the state and move the sequence's cached K/V; it returns indices into `step.block_table`
  the sequence will never read again, which the pool takes back (a null block stands in the table there). It is
  not called for a sequence that finished in the step: its blocks are freed whole.
- **The model's own sliding windows.** `spec.layer_windows[layer]` is the window a model was trained with in that
  layer (None: full attention). A backend honours it (dense attention within it, as `dense` does) or refuses the
  model in `check`; it must never silently attend past it.
- **What the engine may change.** Nothing in a `SeqStep`, its state or `batch.meta` once `prepare` has run; it builds
  new ones each step. The backend object lives as long as the engine, shared by every request that names it.
- **Prefix caching.** `capabilities.exact` False gives a backend's requests their own prefix-cache namespace (its
  KV differs from dense for the same tokens); `capabilities.prefix_caching` False keeps them out of the cache
  (a backend whose blocks do not hold positions in order).
- **Errors.** `check(params)` raises ValueError for params that do not fit the model (a 400 to the client); a
  backend that has lost something it needs to serve raises `BackendUnavailable` (a 503; other backends go on).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Generic

import torch
from pydantic import BaseModel, ConfigDict

from attention_backends.context import AttentionSpec, BackendBatch, MetaT, SeqStep
from attention_backends.kernels.paged import write_kv
from kv_cache.paged_kv import PagedKVCache


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BackendUnavailable(RuntimeError):
    """A backend cannot serve requests any more (a rank of its process group is gone); its requests get 503 while
    the other backends keep serving, and `/health` reports the server degraded."""


@dataclass(frozen=True, slots=True)
class Capabilities:
    exact: bool = False  # output equals dense attention
    prefix_caching: bool = True


class AttentionBackend(Generic[MetaT]):
    """Base class of every backend; the module docstring is the contract."""

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoParams
    capabilities: ClassVar[Capabilities] = Capabilities()
    # A param the server fills, for a chat request that leaves it unset, with the number of prompt tokens from
    # the last user turn on (Star Attention's query); None: the backend does not split chats.
    chat_query_param: ClassVar[str | None] = None

    def __init__(self, kv: PagedKVCache, spec: AttentionSpec) -> None:
        self.kv = kv
        self.spec = spec

    def check(self, params: BaseModel) -> None:
        """Raise ValueError for params that do not fit this model (e.g. a layer index past its last layer)."""

    def new_state(self, params: BaseModel) -> Any:
        """A new sequence's state object; None for a backend that keeps none."""
        return None

    def select_rows(self, step: SeqStep) -> torch.Tensor | None:
        """Positions of the chunk `[num_computed_tokens, end)` that this rank runs, sorted (a backend that shards a
        sequence over ranks may add others, e.g. a prefix it needs); None: the whole chunk."""
        return None

    def prepare(self, batch: BackendBatch[MetaT]) -> MetaT:
        """Once per step, before the first layer: what every layer shares."""
        raise NotImplementedError

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: BackendBatch[MetaT],
                scale: float) -> torch.Tensor:
        raise NotImplementedError

    def store_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Write fresh `[H_kv, T, D]` keys and values to their slots."""
        write_kv(self.kv.k[layer], self.kv.v[layer], k.transpose(0, 1), v.transpose(0, 1), slot_mapping)

    def blocks_to_release(self, step: SeqStep) -> list[int]:
        """After the step (see the contract): block-table indices the sequence will never read again."""
        return []
