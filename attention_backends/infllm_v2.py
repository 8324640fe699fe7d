"""`infllm_v2`: InfLLM-V2's dense-sparse switchable attention (MiniCPM4), over the paged cache.

A sequence whose prompt or total length reaches `dense_len` attends block-sparsely: each query group (the
step's queries inside one selection block) scores every earlier block through compressed keys and attends
to `topk + local_blocks` blocks: the init blocks, the local ones, its own and the best-scoring rest (see
`kernels/block_sparse.py`). Below `dense_len`, and for queries whose blocks all fit in that budget, the
attention is dense, which is also what sparse attention over every block would compute.

Choices where the paper leaves a server free, and why:
- The switch is per query row: sparse iff `max(prompt_len, position + 1) >= dense_len`. A prompt past the
  threshold is sparse from its first token (as the reference sees it whole); a short request that grows past
  it while decoding switches from then on; and the result does not depend on chunking or on a recompute.
- Selection is per query group rather than per token, so the group shares one gather of its blocks; prefill
  chunk boundaries that split a block split its group too.
- Compressed keys are pooled from per-page key means kept in a side table (filled when a page is full,
  freed with the page), so crossing `dense_len` builds nothing but the means of pages not yet summarised.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from attention_backends.base import AttentionBackend, Capabilities
from attention_backends.context import BackendBatch, Phase, SeqStep
from attention_backends.dense import DenseMeta, attend_exact, dense_meta
from attention_backends.kernels.block_sparse import (
    Selection,
    SparsePlan,
    SparseRow,
    attend_block_sparse,
    page_means,
    sparse_plan,
)
from attention_backends.registry import register_backend

MEANS_TABLE = "infllm_v2.key_means"


class InfLLMV2Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dense_len: int = Field(8192, ge=-1, description="sequences shorter than this stay dense; -1: always sparse")
    block_size: int = Field(64, ge=1, description="selection block, tokens (a multiple of the cache block)")
    kernel_size: int = Field(32, ge=1, description="tier-1 compression kernel, tokens; tier 2 is 4x")
    kernel_stride: int = Field(16, ge=1, description="tier-1 compression stride, tokens; tier 2 is 4x")
    topk: int = Field(64, ge=1, description="blocks attended beyond the local ones (init blocks count here)")
    init_blocks: int = Field(1, ge=0, description="leading blocks every query attends")
    local_blocks: int = Field(32, ge=0, description="blocks before the query's own that it always attends")

    @model_validator(mode="after")
    def _check(self) -> InfLLMV2Params:
        if self.kernel_size % self.kernel_stride or self.block_size % self.kernel_stride:
            raise ValueError("kernel_size and block_size must be multiples of kernel_stride")
        if self.topk <= self.init_blocks:
            raise ValueError("topk must exceed init_blocks: the current block needs a place beside the forced ones")
        return self

    def selection(self, page: int) -> Selection:
        return Selection(page, self.block_size, self.kernel_size, self.kernel_stride, self.init_blocks,
                         self.local_blocks, self.topk + self.local_blocks)

    def first_sparse(self, prompt_len: int | None) -> int:
        """The first position that attends block-sparsely in a sequence with this prompt length (None: unknown,
        so only the position decides)."""
        first = (self.topk + self.local_blocks) * self.block_size  # earlier rows see every block anyway
        if self.dense_len >= 0 and (prompt_len is None or prompt_len < self.dense_len):
            first = max(first, self.dense_len - 1)
        return first

    def dense_rows(self, seq: SeqStep) -> int:
        """How many of the step's leading query rows attend densely."""
        return min(max(self.first_sparse(seq.prompt_len) - seq.num_computed_tokens, 0), seq.query_len)


@dataclass(frozen=True, slots=True)
class InfLLMMeta:
    dense: DenseMeta  # the rows that attend densely: a chunk's leading rows, decodes below the switch
    sparse: dict[Selection, SparsePlan]  # the rest: a chunk's trailing rows, decodes past the switch
    fill: torch.Tensor | None  # cache blocks whose key means the sparse rows need and the side table lacks


@register_backend
class InfLLMV2Backend(AttentionBackend[InfLLMMeta]):
    name = "infllm_v2"
    Params = InfLLMV2Params
    capabilities = Capabilities(exact=False)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.means = self.kv.register_side_table(MEANS_TABLE, (self.spec.num_kv_heads, self.spec.head_dim))

    def check(self, params: InfLLMV2Params) -> None:
        page = self.spec.block_size
        if params.kernel_stride % page or params.block_size % page:
            raise ValueError(f"kernel_stride and block_size must be multiples of the KV cache block size ({page})")
        own = [i for i, w in enumerate(self.spec.layer_windows) if w is not None]
        if own:
            raise ValueError(f"infllm_v2 needs full-attention layers; the model's own sliding window covers {own}")

    def prepare(self, batch: BackendBatch[InfLLMMeta]) -> InfLLMMeta:
        dense, fill = [], []
        sparse: dict[Selection, list[SparseRow]] = {}
        for s in batch.seqs:
            r = s.params.dense_rows(s)
            if r:
                dense.append(s if s.phase is Phase.DECODE else replace(s, query_len=r))
            if r < s.query_len:  # sparse rows: their pages' key means must be ready
                pages = s.block_table[: s.context_len // self.spec.block_size]
                fill.append(pages[~self.means.filled[pages]])
                sparse.setdefault(s.params.selection(self.spec.block_size), []).append(
                    SparseRow(s.query_start + r, s.block_table, s.num_computed_tokens + r, s.query_len - r))
        plans = {sel: sparse_plan(rows, sel, self.kv.device) for sel, rows in sparse.items()}
        return InfLLMMeta(dense_meta(dense, self.spec, self.kv), plans, torch.cat(fill).unique() if fill else None)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: BackendBatch[InfLLMMeta],
                scale: float) -> torch.Tensor:
        self.store_kv(layer, k, v, batch.slot_mapping)
        meta, kc, vc = batch.meta, self.kv.k[layer], self.kv.v[layer]
        self._fill_means(layer, meta.fill)
        out = torch.empty_like(q)
        attend_exact(out, meta.dense, q, k, v, kc, vc, None, scale)
        for sel, plan in meta.sparse.items():
            attend_block_sparse(out, q, kc, vc, self.means.data[layer], plan, sel, scale)
        return out

    def _fill_means(self, layer: int, pages: torch.Tensor | None) -> None:
        if pages is None or not pages.numel():
            return
        self.means.data[layer, pages] = page_means(self.kv.k[layer], pages.to(self.kv.device))
        if layer == self.spec.num_layers - 1:  # every layer has its means now
            self.means.filled[pages] = True
