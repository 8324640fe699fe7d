"""The backend contract: `prepare(batch)` once per step, `forward(layer, q, k, v, batch, scale)` per layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from attention_backends.context import AttentionSpec, BackendBatch, SeqStep
from kv_cache.paged_kv import PagedKVCache


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True, slots=True)
class Capabilities:
    exact: bool = False  # output equals dense attention
    chunked_prefill: bool = True
    prefix_caching: bool = True
    releases_blocks: bool = False  # implements blocks_to_release()
    needs_calibration: bool = False  # a `CalibratedBackend`: needs an artifact from offline calibration


class AttentionBackend:
    """Base class of every backend. Tensors are head-major: q `[H_q, T, D]`, k/v `[H_kv, T, D]`, where T
    counts this backend's tokens of the step in packed order; forward returns `[H_q, T, D]`."""

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoParams
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, kv: PagedKVCache, spec: AttentionSpec) -> None:
        self.kv = kv
        self.spec = spec

    def check(self, params: BaseModel) -> None:
        """Raise ValueError for params that do not fit this model (e.g. a layer index past its last layer)."""

    def select_rows(self, step: SeqStep) -> torch.Tensor | None:
        """Positions of the scheduled chunk `[num_cached, num_cached + query_len)` that this rank runs, sorted
        (a backend that shards a sequence over ranks may add others, e.g. a prefix it needs); None: the chunk."""
        return None

    def prepare(self, batch: BackendBatch) -> None:
        """Once per step, before the first layer: build what every layer shares into `batch.meta`."""

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: BackendBatch, scale: float
    ) -> torch.Tensor:
        raise NotImplementedError

    def store_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: BackendBatch) -> None:
        self.kv.write(layer, k.transpose(0, 1), v.transpose(0, 1), batch.slot_mapping)

    def blocks_to_release(self, seq: SeqStep) -> list[int]:
        """Indices into the sequence's block table it will never read again. Called after the step ran, with
        `seq.num_cached` already counting the step's tokens."""
        return []
