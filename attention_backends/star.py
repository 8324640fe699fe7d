"""`star`: Star Attention (NVIDIA): blockwise context encoding with an anchor block, exact attention at query time.

A prompt splits into a context (its first `context_len` tokens) and a query (the rest, plus every generated
token). Phase 1: a context token in block i >= 1 attends to the anchor (the first `anchor_size` tokens of
block 0) and causally to its own block; block 0 is plain causal. Phase 2: query and generated tokens attend
exactly to everything before them.

Sharded (a `RankGroup` of several ranks attached): context blocks go round-robin to the ranks, so every
chunk of a chunked prefill keeps all ranks busy; each rank runs its own blocks (a worker first encodes the
anchor itself, uses it for its blocks, then drops it) and every rank runs every query and generated token.
In phase 2 each rank attends to the KV it holds and the ranks merge (output, log-sum-exp) exactly. Query
and generated tokens' KV lives on rank 0 (the paper keeps it on the last host; which rank holds it does not
change the math). Other ranks see all of their context non-causally, which is the fix to the reference
code's bottom-right causal mask (it hid a host's last context tokens from early query tokens).

Without a group, or for a context of one block, the same backend runs on one rank: anchor-prefixed
blockwise prefill and exact decode; a context of one block is exactly dense attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from attention_backends.base import Capabilities
from attention_backends.context import BackendBatch, Phase, SeqStep
from attention_backends.dense import DenseBackend
from attention_backends.kernels.merge import attention_with_lse, merge_attention_states
from attention_backends.kernels.paged import gather_range, prefill_attention
from attention_backends.registry import register_backend

QUERY_RANK = 0  # holds the KV of query and generated tokens


class StarUnavailable(RuntimeError):
    """A rank of the Star Attention group is gone (exited, hung past the timeout, or its link broke)."""


class RankGroup(Protocol):
    """What the backend needs from the ranks it runs with (engine/star_group.py implements it)."""

    rank: int
    world_size: int

    def check(self) -> None:
        """Raise StarUnavailable if the group can no longer run a step."""

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t`, stacked rank-major: `[world_size, *t.shape]`."""


class StarParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    block_size: int = Field(2048, ge=1, description="context block, tokens (a multiple of the cache block)")
    anchor_size: int | None = Field(None, ge=1, description="leading tokens of block 0 in front of every other "
                                                            "block; default: block_size, as the paper recommends")
    query_tokens: int = Field(128, ge=1, description="trailing prompt tokens that form the query; chat requests "
                                                     "split at the last user turn instead")

    @model_validator(mode="after")
    def _check(self) -> StarParams:
        if self.anchor_size is not None and self.anchor_size > self.block_size:
            raise ValueError("anchor_size must not exceed block_size")
        return self

    @property
    def anchor(self) -> int:
        return self.anchor_size or self.block_size


@dataclass(frozen=True, slots=True)
class StarLayout:
    """Where one request's tokens live: `world` ranks (1: one rank holds everything)."""

    context_len: int
    block: int
    anchor: int
    world: int

    @classmethod
    def of(cls, params: StarParams, prompt_len: int, world: int) -> StarLayout:
        context_len = max(0, prompt_len - params.query_tokens)
        sharded = world > 1 and context_len > params.block_size
        return cls(context_len, params.block_size, params.anchor, world if sharded else 1)

    @property
    def sharded(self) -> bool:
        return self.world > 1

    def owner(self, pos: torch.Tensor) -> torch.Tensor:
        """The rank that keeps each position's KV."""
        return torch.where(pos < self.context_len, (pos // self.block) % self.world, QUERY_RANK)

    def rows(self, rank: int, start: int, end: int, anchor_done: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions rank `rank` runs of the chunk `[start, end)`, and which of them it writes to its cache:
        its context blocks (behind the anchor, on a rank that has not encoded it yet) and every query row."""
        pos = torch.arange(start, end)
        query = pos >= self.context_len
        mine = (self.owner(pos) == rank) & ~query
        if rank != QUERY_RANK and not anchor_done and bool(mine.any()):
            pos = torch.cat([torch.arange(self.anchor), pos])
            query = torch.cat([torch.zeros(self.anchor, dtype=torch.bool), query])
            mine = torch.cat([torch.ones(self.anchor, dtype=torch.bool), mine])
        keep = mine | query
        return pos[keep], (mine | (query & (rank == QUERY_RANK)))[keep]

    def blocks_written(self, rank: int, start: int, end: int, anchor_done: bool, cache_block: int) -> set[int]:
        """Block-table entries rank `rank` writes for the chunk: all a worker allocates for it."""
        pos, writes = self.rows(rank, start, end, anchor_done)
        return set((pos[writes] // cache_block).tolist())


@dataclass(slots=True)
class Segment:
    """Packed rows `[start, end)` at consecutive positions, over the keys of position ranges `ranges` (gathered
    in order), the first `offset` keys visible to every row and the rest causally."""

    start: int
    end: int
    ranges: list[tuple[int, int]]
    block_table: torch.Tensor
    offset: int


@dataclass(slots=True)
class Shard:
    """One sharded sequence's phase-2 rows `[start, end)`: this rank's KV blocks and which keys each row sees."""

    start: int
    end: int
    blocks: torch.Tensor
    visible: torch.Tensor  # [rows, blocks * block_size]


@register_backend
class StarBackend(DenseBackend):
    name = "star"
    Params = StarParams
    # Context KV differs from dense and depends on the request's context/query split, which the prefix cache
    # cannot see in the tokens.
    capabilities = Capabilities(prefix_caching=False)

    group: RankGroup | None = None

    def attach(self, group: RankGroup) -> None:
        self.group = group

    @property
    def rank(self) -> int:
        return self.group.rank if self.group else 0

    def layout(self, params: StarParams, prompt_len: int) -> StarLayout:
        return StarLayout.of(params, prompt_len, self.group.world_size if self.group else 1)

    def check(self, params: BaseModel) -> None:
        assert isinstance(params, StarParams)
        bs = self.spec.block_size
        if params.block_size % bs or params.anchor % bs:
            raise ValueError(f"block_size and anchor_size must be multiples of the KV cache block ({bs})")
        if any(w is not None for w in self.spec.layer_windows):
            raise ValueError("star does not combine with a model's own sliding window")
        if self.group is not None:
            self.group.check()

    def select_rows(self, step: SeqStep) -> torch.Tensor | None:
        lay = self.layout(step.params, step.prompt_len)
        if not lay.sharded:
            return None
        self.group.check()
        end = step.num_cached + step.query_len
        pos, writes = lay.rows(self.rank, step.num_cached, end, step.state.get("anchor_done", False))
        step.state["anchor_done"] = step.state.get("anchor_done", False) or bool(writes.any())
        step.state["writes"], step.state["end"] = writes, end
        return pos

    def prepare(self, batch: BackendBatch) -> None:
        segments, decodes, shards, writes = [], [], [], []
        for seq in batch.seqs:
            lay = self.layout(seq.params, seq.prompt_len)
            pos = seq.positions if seq.positions is not None else torch.arange(seq.num_cached, seq.context_len)
            writes.append(seq.state["writes"] if lay.sharded else torch.ones(len(pos), dtype=torch.bool))
            if seq.phase is Phase.DECODE and not lay.sharded:
                decodes.append(seq)
                continue
            n_ctx = int((pos < lay.context_len).sum()) if lay.sharded else len(pos)
            segments += self._segments(seq, pos[:n_ctx], lay)
            if n_ctx < len(pos):
                shards.append(self._shard(seq, pos, n_ctx, lay))
        write = torch.cat(writes) if writes else torch.zeros(0, dtype=torch.bool)
        batch.meta.update(segments=segments, decode=self.decode_rows(decodes), shards=shards,
                          write=None if bool(write.all()) else write.nonzero().squeeze(1))

    def _segments(self, seq: SeqStep, pos: torch.Tensor, lay: StarLayout) -> list[Segment]:
        """Runs of rows in one context block (phase 1), or of query rows on one rank (exact and causal)."""
        out: list[Segment] = []
        if not len(pos):
            return out
        kind = torch.where(pos < lay.context_len, pos // lay.block, -1)
        breaks = ((kind.diff() != 0) | (pos.diff() != 1)).nonzero().squeeze(1) + 1
        bounds = [0, *breaks.tolist(), len(pos)]
        for s, e in zip(bounds, bounds[1:]):
            first, last = int(pos[s]), int(pos[e - 1]) + 1
            block = int(kind[s])
            if block <= 0:
                ranges, offset = [(0, last)], first
            else:
                start = block * lay.block
                ranges, offset = [(0, lay.anchor), (start, last)], lay.anchor + first - start
            out.append(Segment(seq.query_start + s, seq.query_start + e, ranges, seq.block_table, offset))
        return out

    def _shard(self, seq: SeqStep, pos: torch.Tensor, n_ctx: int, lay: StarLayout) -> Shard:
        qpos = pos[n_ctx:]
        bs = self.spec.block_size
        keys = torch.arange(int(qpos[-1]) + 1)
        mine = keys[lay.owner(keys) == self.rank]
        blocks = torch.unique(mine // bs)
        kpos = (blocks.unsqueeze(1) * bs + torch.arange(bs)).flatten()
        visible = (lay.owner(kpos) == self.rank) & (kpos.unsqueeze(0) <= qpos.unsqueeze(1))
        return Shard(seq.query_start + n_ctx, seq.query_start + len(pos), seq.block_table[blocks], visible)

    def store_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: BackendBatch) -> None:
        keep = batch.meta["write"]
        if keep is None:
            return super().store_kv(layer, k, v, batch)
        self.kv.write(layer, k[:, keep].transpose(0, 1), v[:, keep].transpose(0, 1), batch.slot_mapping[keep])

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: BackendBatch,
                scale: float) -> torch.Tensor:
        self.store_kv(layer, k, v, batch)
        out = torch.empty_like(q)
        for seg in batch.meta["segments"]:
            keys = [gather_range(self.kv, layer, seg.block_table, s, e) for s, e in seg.ranges]
            kc, vc = (torch.cat(parts, dim=1) if len(parts) > 1 else parts[0] for parts in zip(*keys))
            out[:, seg.start : seg.end] = prefill_attention(q[:, seg.start : seg.end], kc, vc, seg.offset, scale)
        if batch.meta["decode"] is not None:
            self.decode(layer, q, batch.meta["decode"], scale, out)
        if batch.meta["shards"]:
            self._merge_shards(layer, q, batch.meta["shards"], scale, out)
        return out

    def _merge_shards(self, layer: int, q: torch.Tensor, shards: list[Shard], scale: float, out: torch.Tensor
                      ) -> None:
        """Every rank's (output, LSE) over the KV it holds, gathered and merged: exact attention over all ranks."""
        parts = []
        for sh in shards:
            kb, vb = (t.flatten(0, 1).transpose(0, 1) for t in self.kv.gather(layer, sh.blocks))
            o, lse = attention_with_lse(q[:, sh.start : sh.end], kb, vb, sh.visible, scale)
            parts.append(torch.cat([o, lse.unsqueeze(-1)], dim=-1))
        gathered = self.group.all_gather(torch.cat(parts, dim=1))  # [world, H_q, rows, D + 1]
        merged, _ = merge_attention_states(gathered[..., :-1], gathered[..., -1])
        row = 0
        for sh in shards:
            n = sh.end - sh.start
            out[:, sh.start : sh.end] = merged[:, row : row + n].to(out.dtype)
            row += n

    def blocks_to_release(self, seq: SeqStep) -> list[int]:
        """Sharded: rank 0 gives back the table entries of other ranks' context blocks (it never writes them); a
        worker drops the anchor it encoded once the whole context is encoded."""
        lay = self.layout(seq.params, seq.prompt_len)
        if not lay.sharded:
            return []
        bs, end = self.spec.block_size, seq.state["end"]
        if self.rank == QUERY_RANK:
            done = seq.state.get("released", 0)
            seq.state["released"] = last = min(end, lay.context_len) // bs
            return [j for j in range(done, last) if (j * bs // lay.block) % lay.world != QUERY_RANK]
        if not seq.state.get("anchor_done") or seq.state.get("anchor_dropped") or end < lay.context_len:
            return []
        seq.state["anchor_dropped"] = True
        return list(range(lay.anchor // bs))
