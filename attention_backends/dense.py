"""`dense`: exact attention over the paged cache; the oracle every other backend reduces to."""

from __future__ import annotations

import torch

from attention_backends.base import AttentionBackend, Capabilities
from attention_backends.context import BackendBatch, Phase
from attention_backends.kernels.paged import decode_attention, gather_context, padded_block_tables, prefill_attention
from attention_backends.registry import register_backend


@register_backend
class DenseBackend(AttentionBackend):
    name = "dense"
    capabilities = Capabilities(exact=True)

    def prepare(self, batch: BackendBatch) -> None:
        batch.meta["prefill"] = [s for s in batch.seqs if s.phase is Phase.PREFILL]
        decodes = [s for s in batch.seqs if s.phase is Phase.DECODE]
        batch.meta["decode"] = None
        if decodes:
            lens = [s.context_len for s in decodes]
            tables, valid = padded_block_tables([s.block_table for s in decodes], lens, self.spec.block_size)
            index = torch.tensor([s.query_start for s in decodes])
            batch.meta["decode"] = (index, tables, valid, torch.tensor(lens))

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: BackendBatch,
                scale: float) -> torch.Tensor:
        self.store_kv(layer, k, v, batch)
        window = self.spec.layer_windows[layer]
        out = torch.empty_like(q)
        for seq in batch.meta["prefill"]:
            s, e = seq.query_start, seq.query_start + seq.query_len
            if seq.num_cached:
                kc, vc = gather_context(self.kv, layer, seq.block_table, seq.context_len)
            else:  # nothing cached before this chunk: its own fresh K/V is the whole context
                kc, vc = k[:, s:e], v[:, s:e]
            out[:, s:e] = prefill_attention(q[:, s:e], kc, vc, seq.num_cached, scale, window)
        if batch.meta["decode"] is not None:
            index, tables, valid, lens = batch.meta["decode"]
            if window is not None:
                keys = torch.arange(tables.shape[1] * self.spec.block_size)
                in_window = (keys >= (lens - window).unsqueeze(1)) & (keys < lens.unsqueeze(1))
                valid = in_window if valid is None else valid & in_window
            kd, vd = (t.flatten(1, 2) for t in self.kv.gather(layer, tables))
            out[:, index] = decode_attention(q[:, index].transpose(0, 1), kd, vd, valid, scale).transpose(0, 1)
        return out
