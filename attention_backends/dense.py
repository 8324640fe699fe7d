"""`dense`: exact attention over the paged cache; the oracle every other backend reduces to."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attention_backends.base import AttentionBackend, Capabilities
from attention_backends.context import BackendBatch, Phase, SeqStep
from attention_backends.kernels.paged import decode_attention, gather_context, padded_block_tables, prefill_attention
from attention_backends.registry import register_backend


@dataclass(slots=True)
class DecodeRows:
    """Batched decode inputs: each row's query index in the batch, block table, valid keys, context length."""

    index: torch.Tensor  # [B]
    tables: torch.Tensor  # [B, N]
    valid: torch.Tensor | None  # [B, N * block_size]; None: every key valid
    lens: torch.Tensor  # [B]

    def take(self, rows: list[int]) -> DecodeRows:
        r = torch.tensor(rows)
        return DecodeRows(self.index[r], self.tables[r], None if self.valid is None else self.valid[r], self.lens[r])


@register_backend
class DenseBackend(AttentionBackend):
    name = "dense"
    capabilities = Capabilities(exact=True)

    def prepare(self, batch: BackendBatch) -> None:
        self.split_phases(batch)
        batch.meta["decode"] = self.decode_rows(batch.meta["decodes"])

    @staticmethod
    def split_phases(batch: BackendBatch) -> None:
        batch.meta["prefill"] = [s for s in batch.seqs if s.phase is Phase.PREFILL]
        batch.meta["decodes"] = [s for s in batch.seqs if s.phase is Phase.DECODE]

    def decode_rows(self, decodes: list[SeqStep]) -> DecodeRows | None:
        if not decodes:
            return None
        lens = [s.context_len for s in decodes]
        tables, valid = padded_block_tables([s.block_table for s in decodes], lens, self.spec.block_size)
        return DecodeRows(torch.tensor([s.query_start for s in decodes]), tables, valid, torch.tensor(lens))

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: BackendBatch,
                scale: float) -> torch.Tensor:
        self.store_kv(layer, k, v, batch)
        out = torch.empty_like(q)
        for seq in batch.meta["prefill"]:
            self.prefill(layer, q, k, v, seq, scale, out)
        if batch.meta["decode"] is not None:
            self.decode(layer, q, batch.meta["decode"], scale, out)
        return out

    def prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: SeqStep, scale: float,
                out: torch.Tensor) -> None:
        """Causal attention of one prefill chunk over its whole context, with the model's own window if any."""
        s, e = seq.query_start, seq.query_start + seq.query_len
        if seq.num_cached:
            kc, vc = gather_context(self.kv, layer, seq.block_table, seq.context_len)
        else:  # nothing cached before this chunk: its own fresh K/V is the whole context
            kc, vc = k[:, s:e], v[:, s:e]
        out[:, s:e] = prefill_attention(q[:, s:e], kc, vc, seq.num_cached, scale, self.spec.layer_windows[layer])

    def decode(self, layer: int, q: torch.Tensor, rows: DecodeRows, scale: float, out: torch.Tensor) -> None:
        """One query per row over the keys its table and mask allow, and the model's own window if any."""
        valid, window = rows.valid, self.spec.layer_windows[layer]
        if window is not None:
            keys = torch.arange(rows.tables.shape[1] * self.spec.block_size)
            in_window = (keys >= (rows.lens - window).unsqueeze(1)) & (keys < rows.lens.unsqueeze(1))
            valid = in_window if valid is None else valid & in_window
        kd, vd = (t.flatten(1, 2) for t in self.kv.gather(layer, rows.tables))
        out[:, rows.index] = decode_attention(q[:, rows.index].transpose(0, 1), kd, vd, valid, scale).transpose(0, 1)
