"""`tca`: TCA-Attention (You et al., 2025), training-free context-adaptive attention, with KV eviction.

The paper's code is not public; `algorithms.md` section 3 reconstructs the method and these are the
simplest choices consistent with it:
- A block is a cache block (b = 16 tokens), so a block keeps 1, 2, 4, 8 or 16 tokens per KV head.
- Budgets are per (layer, KV head), calibrated offline (`tca_calibration.py`): under GQA a token leaves
  memory only when no head keeps it, so per-query-head budgets would save nothing.
- When a block completes, its last query (averaged over its KV group's heads) attends to the block's keys;
  redundancy = 1 - entropy / log b sets the block's budget against the head's calibrated thresholds, and
  the head keeps its top-k tokens of that attention. The decision is final.
- A query sees, per KV head, the kept tokens of compacted blocks, and every token from the sequence's
  frontier on: the last `local_blocks` blocks at decode, and in prefill also the whole chunk so far
  (earlier chunks are already compacted), so a prompt's result depends on its chunking.
- After each step, blocks behind the local window are compacted: each (layer, KV head) packs the tokens it
  keeps into region "head pages": one KV head's column of one layer's plane of a region block. Any
  (layer, head) may fill any head page (the cache is one tensor across layers), so a sequence holds the
  *mean* kept share over layers and heads, not the union over a layer's heads or the largest layer's.
  Region blocks are the first compacted blocks themselves; the rest return to the pool. They hold no
  positions, so TCA requests take no part in prefix caching.
- The dense floor: nothing is compacted until the sequence holds `dense_len` tokens, so a shorter one attends to
  every token, exactly as `dense`; past it, the blocks behind the local window are compacted at once, with the
  budgets their completion decided. The default 2,048 is measured on the embedded model: a 2k request's whole
  cache is under 5% of `make serve`'s 2 GiB pool, so evicting there saves little; without the floor the served
  recipe lost a 2k passkey (BENCHMARKS.md, issue 5); with it every 1k and 2k cell of the issue-18 matrix is
  dense's answer.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
from pydantic import Field

from attention_backends.base import Capabilities
from attention_backends.calibration import CalibratedBackend, CalibratedParams
from attention_backends.context import BackendBatch, Phase, SeqStep
from attention_backends.kernels.paged import cdiv, gather_range, sdpa
from attention_backends.kernels.slots import slot_attention
from attention_backends.registry import register_backend
from attention_backends.tca_calibration import TCACalibrator, block_attention, budget_class, redundancy

KEEP_TABLE = "tca.keep"
TILE = 256  # query rows per attention call in prefill


class TCAParams(CalibratedParams):
    shaping = ("tolerance", "local_blocks")
    per_block_size = True  # budgets are counts of a block's tokens

    tolerance: float = Field(0.01, gt=0, lt=1, description="calibration: attention mass a head may lose")
    local_blocks: int = Field(4, ge=1, description="most recent blocks kept whole, the current one included")
    dense_len: int = Field(2048, ge=0, description="nothing is evicted until the sequence holds this many tokens")


@dataclass(frozen=True, slots=True)
class Budgets:
    thresholds: torch.Tensor  # [layers, H_kv, m - 1], descending redundancy thresholds


@dataclass(slots=True)
class TCAState:
    """One sequence's compaction: positions before `frontier` are compacted into its region."""

    rows: list[list[torch.Tensor]]  # per (layer, KV head): rows of `k_all.view(-1, D)` holding its kept tokens
    spare: list[list[list[int]]]  # per (layer, KV head): rows left free in its last head page
    frontier: int = 0
    region: list[int] = field(default_factory=list)  # block-table indices whose blocks hold head pages
    free: deque[torch.Tensor] = field(default_factory=deque)  # head pages no (layer, head) has taken yet


def completed_blocks(start: int, length: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks of a sequence whose last token is among a step's rows at positions `[start, start + length)`:
    their indices in its block table, and the rows (counted from the step's first) of their last tokens."""
    first, last = cdiv(start + 1, block), (start + length) // block
    blocks = torch.arange(first - 1, last)
    return blocks, (blocks + 1) * block - 1 - start


def keep_masks(probe: torch.Tensor, keys: torch.Tensor, thresholds: torch.Tensor, scale: float) -> torch.Tensor:
    """Which tokens each KV head keeps `[N, bs, H_kv]` of N completed blocks with keys `[N, bs, H_kv, D]`, decided
    by their last queries `probe` `[H_q, N, D]` against one layer's thresholds `[H_kv, m - 1]`."""
    n, hkv = keys.shape[0], keys.shape[2]
    a = block_attention(probe.reshape(hkv, -1, n, probe.shape[-1]), keys, scale)
    budget = 2 ** budget_class(redundancy(a), thresholds.unsqueeze(1))  # [H_kv, N]
    keep = a.argsort(-1, descending=True).argsort(-1) < budget.unsqueeze(-1)  # [H_kv, N, bs]
    return keep.permute(1, 2, 0)


def frontier(start: int, block: int, params: TCAParams) -> int:
    """Where a sequence's compacted blocks end before a step at `start`: the steps before it (the last ending at
    `start`) compact the blocks behind the local window once the sequence holds `dense_len` tokens."""
    if start < params.dense_len:
        return 0
    return max(0, ((start - 1) // block - params.local_blocks + 1) * block)


@dataclass(frozen=True, slots=True)
class TCAMeta:
    # Blocks that complete in this step: (sequence, batch rows of their last queries, their block ids).
    completed: list[tuple[SeqStep, torch.Tensor, torch.Tensor]]


@register_backend
class TCABackend(CalibratedBackend[TCAMeta]):
    name = "tca"
    Params = TCAParams
    capabilities = Capabilities(exact=False, prefix_caching=False)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.keep = self.kv.register_side_table(KEEP_TABLE, (self.spec.block_size, self.spec.num_kv_heads),
                                                torch.bool)

    def calibrator(self, params: TCAParams) -> TCACalibrator:
        return TCACalibrator(self.spec.block_size, params.local_blocks, params.tolerance)

    def from_tensors(self, tensors: dict[str, torch.Tensor]) -> Budgets:
        thr = tensors["thresholds"]
        m = self.spec.block_size.bit_length()  # budgets 1, 2, ..., block_size
        want = (self.spec.num_layers, self.spec.num_kv_heads, m - 1)
        if tuple(thr.shape) != want:
            raise ValueError(f"the TCA artifact's thresholds are {tuple(thr.shape)}, this model needs {want}")
        return Budgets(thr.to(self.kv.device, torch.float32))

    def new_state(self, params: TCAParams) -> TCAState:
        heads, layers = range(self.spec.num_kv_heads), range(self.spec.num_layers)
        return TCAState(rows=[[torch.zeros(0, dtype=torch.long) for _ in heads] for _ in layers],
                        spare=[[[] for _ in heads] for _ in layers])

    def prepare(self, batch: BackendBatch[TCAMeta]) -> TCAMeta:
        completed = []
        for s in batch.seqs:
            blocks, rows = completed_blocks(s.num_computed_tokens, s.query_len, self.spec.block_size)
            if len(blocks):
                completed.append((s, s.query_start + rows, s.block_table[blocks]))
        return TCAMeta(completed)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: BackendBatch[TCAMeta],
                scale: float) -> torch.Tensor:
        self.store_kv(layer, k, v, batch.slot_mapping)
        for seq, rows, blocks in batch.meta.completed:
            self.decide(layer, q[:, rows], blocks, self.artifact(seq.params), scale)
        out = torch.empty_like(q)
        for seq in batch.seqs:
            if seq.phase is Phase.DECODE:
                self.decode(layer, q, seq, scale, out)
                continue
            region = self.region(layer, seq)
            for t0 in range(0, seq.query_len, TILE):
                n = min(TILE, seq.query_len - t0)
                self.attend(layer, q, seq, region, seq.query_start + t0, seq.num_computed_tokens + t0, n, scale, out)
        return out

    def decide(self, layer: int, probe: torch.Tensor, blocks: torch.Tensor, budgets: Budgets, scale: float) -> None:
        """Keep masks of just-completed blocks, from their last queries `probe` `[H_q, N, D]`."""
        dev = blocks.to(self.kv.device)
        self.keep.data[layer, dev] = keep_masks(probe, self.kv.k[layer][dev], budgets.thresholds[layer], scale)

    def region_rows(self, layer: int, seq: SeqStep[TCAParams, TCAState]) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's region tokens per KV head, padded to the longest: their rows `[H_kv, C]` of `k_all.view(-1, D)`
        (a head's tokens may sit in any head's column of any layer's plane), and which are real."""
        rows = seq.state.rows[layer]
        n = max(len(r) for r in rows)
        padded = torch.stack([torch.cat([r, r.new_zeros(n - len(r))]) for r in rows])
        return padded, torch.arange(n) < torch.tensor([len(r) for r in rows]).unsqueeze(1)

    def region(self, layer: int, seq: SeqStep[TCAParams, TCAState]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer's region tokens per KV head: K and V `[H_kv, C, D]`, and which of them each query head sees
        `[H_q, C]`."""
        rows, valid = self.region_rows(layer, seq)
        rows, d = rows.to(self.kv.device), self.spec.head_dim
        kr, vr = (t.view(-1, d)[rows] for t in (self.kv.k_all, self.kv.v_all))
        return kr, vr, valid.to(self.kv.device).repeat_interleave(self.spec.num_heads // self.spec.num_kv_heads, 0)

    def decode(self, layer: int, q: torch.Tensor, seq: SeqStep[TCAParams, TCAState], scale: float, out: torch.Tensor
               ) -> None:
        """A decode query over the kept region tokens and every token from the frontier on, through the kernel
        layer's slot attention: the cache of all layers seen as rows (blocks of one token, one KV head), so each KV
        head's list is its region rows, then the frontier's rows of its own column."""
        rows, kept = self.region_rows(layer, seq)
        bs, hkv, d = self.spec.block_size, self.spec.num_kv_heads, self.spec.head_dim
        pos = torch.arange(seq.state.frontier, seq.context_len)
        slots = (layer * self.kv.num_blocks + seq.block_table[pos // bs]) * bs + pos % bs
        recent = slots * hkv + torch.arange(hkv).unsqueeze(1)  # [H_kv, L - frontier]
        rows = torch.cat([rows, recent], 1).unsqueeze(1)  # [H_kv, 1, C + L - frontier]
        visible = torch.cat([kept, torch.ones(hkv, len(pos), dtype=torch.bool)], 1).unsqueeze(1)
        row = seq.query_start
        out[:, row : row + 1] = slot_attention(q[:, row : row + 1], self.kv.k_all.view(-1, 1, 1, d),
                                               self.kv.v_all.view(-1, 1, 1, d), rows, visible, scale)

    def attend(self, layer: int, q: torch.Tensor, seq: SeqStep[TCAParams, TCAState], region: tuple[torch.Tensor, ...],
               start: int, pos: int, n: int, scale: float, out: torch.Tensor) -> None:
        """Rows `start..start+n` (positions `pos..`): kept region tokens per KV head, then every token from
        the frontier on, causally."""
        (kr, vr, kept), first = region, seq.state.frontier
        kp, vp = gather_range(self.kv.k[layer], self.kv.v[layer], seq.block_table, first, pos + n)
        kpos = torch.arange(first, pos + n, device=kept.device)
        causal = kpos <= torch.arange(pos, pos + n, device=kept.device).unsqueeze(1)  # [n, L - frontier]
        mask = torch.cat([kept.unsqueeze(1).expand(-1, n, -1), causal.expand(len(kept), -1, -1)], -1)
        out[:, start : start + n] = sdpa(q[:, start : start + n], torch.cat([kr, kp], 1), torch.cat([vr, vp], 1),
                                         scale, mask=mask)

    def blocks_to_release(self, step: SeqStep[TCAParams, TCAState]) -> list[int]:
        """Compact the blocks that left the local window; give back those the region did not absorb."""
        st, bs, hkv, layers = step.state, self.spec.block_size, self.spec.num_kv_heads, self.spec.num_layers
        end = frontier(step.end, bs, step.params)
        if end <= st.frontier:
            return []
        indices = list(range(st.frontier // bs, end // bs))
        slots = (step.block_table[indices].unsqueeze(1) * bs + torch.arange(bs)).flatten()
        moved = []  # per (layer, head): the rows of the tokens it keeps, and their K/V, read before any write
        for layer in range(layers):
            keep = self.keep.data[layer].view(-1, hkv)[slots.to(self.kv.device)].cpu()  # [tokens, H_kv]
            for h in range(hkv):
                rows = ((layer * self.kv.num_blocks * bs + slots[keep[:, h]]) * hkv + h).to(self.kv.device)
                moved.append((layer, h, self.kv.k_all.view(-1, self.spec.head_dim)[rows],
                              self.kv.v_all.view(-1, self.spec.head_dim)[rows]))
        pages = sum(max(0, cdiv(len(kk) - len(st.spare[layer][h]), bs)) for layer, h, kk, _ in moved)
        absorbed = indices[: max(0, cdiv(pages - len(st.free), layers * hkv))]
        st.region.extend(absorbed)
        for i in absorbed:  # a head page: rows of slots 0..bs-1 of one (plane, block, head)
            block = int(step.block_table[i])
            st.free.extend(((plane * self.kv.num_blocks + block) * bs + torch.arange(bs)) * hkv + h
                           for plane in range(layers) for h in range(hkv))
        for layer, h, kk, vv in moved:
            spare = st.spare[layer][h]
            while len(spare) < len(kk):
                spare.extend(st.free.popleft().tolist())
            dst = torch.tensor(spare[: len(kk)], dtype=torch.long)
            del spare[: len(kk)]
            st.rows[layer][h] = torch.cat([st.rows[layer][h], dst])
            self.kv.k_all.view(-1, self.spec.head_dim)[dst.to(self.kv.device)] = kk
            self.kv.v_all.view(-1, self.spec.head_dim)[dst.to(self.kv.device)] = vv
        st.frontier = end
        return indices[len(absorbed):]
