"""A backend of the scorer kind, whole: keep the cached keys of smallest norm (kvpress's KnormPress)."""

from __future__ import annotations

import torch

from attention_backends.context import SeqStep
from attention_backends.kernels.paged import gather_range
from attention_backends.scorer import ScorerBackend


class KnormBackend(ScorerBackend):
    name = "knorm"

    def score(self, layer: int, q: torch.Tensor, seq: SeqStep, pos: int) -> torch.Tensor:
        n = q.shape[1]
        keys, _ = gather_range(self.kv.k[layer], self.kv.v[layer], seq.block_table, 0, pos + n)
        return -keys.norm(dim=-1).unsqueeze(1).expand(-1, n, -1)  # [H_kv, n, L]: one key set per KV head
