"""`dense`: exact attention over the paged cache; the oracle every other backend reduces to."""

from __future__ import annotations

import torch

from attention_backends.base import AttentionBackend, Capabilities
from attention_backends.context import BackendBatch, Phase
from attention_backends.kernels.paged import context_slots, decode_attention, decode_slots, prefill_attention
from attention_backends.registry import register_backend


@register_backend
class DenseBackend(AttentionBackend):
    name = "dense"
    capabilities = Capabilities(exact=True)

    def prepare(self, batch: BackendBatch) -> None:
        bs = self.spec.block_size
        prefill = []
        for seq in batch.seqs:
            if seq.phase is Phase.PREFILL:
                # A chunk with nothing cached before it attends to its own fresh K/V; no gather needed.
                slots = context_slots(seq.block_table, 0, seq.context_len, bs) if seq.num_cached else None
                prefill.append((seq, slots))
        decodes = [s for s in batch.seqs if s.phase is Phase.DECODE]
        batch.meta["prefill"] = prefill
        batch.meta["decode"] = None
        if decodes:
            lens = [s.context_len for s in decodes]
            slots, valid = decode_slots([s.block_table for s in decodes], lens, bs)
            index = torch.tensor([s.query_start for s in decodes])
            batch.meta["decode"] = (index, slots, valid, torch.tensor(lens))

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: BackendBatch,
                scale: float) -> torch.Tensor:
        self.store_kv(layer, k, v, batch)
        window = self.spec.layer_windows[layer]
        out = torch.empty_like(q)
        for seq, slots in batch.meta["prefill"]:
            s, e = seq.query_start, seq.query_start + seq.query_len
            if slots is None:
                kc, vc = k[:, s:e], v[:, s:e]
            else:
                kc, vc = (t.transpose(0, 1) for t in self.kv.gather(layer, slots))
            out[:, s:e] = prefill_attention(q[:, s:e], kc, vc, seq.num_cached, scale, window)
        if batch.meta["decode"] is not None:
            index, slots, valid, lens = batch.meta["decode"]
            if window is not None:
                valid = valid & (torch.arange(valid.shape[1]) >= (lens - window).unsqueeze(1))
            kd, vd = self.kv.gather(layer, slots)
            out[:, index] = decode_attention(q[:, index].transpose(0, 1), kd, vd, valid, scale).transpose(0, 1)
        return out
