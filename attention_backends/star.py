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

from attention_backends.base import AttentionBackend, Capabilities
from attention_backends.context import BackendBatch, Phase, SeqStep
from attention_backends.dense import DecodeRows, attend_decode, exact_decode
from attention_backends.kernels.merge import attention_with_lse, merge_attention_states
from attention_backends.kernels.paged import take_blocks, write_kv
from attention_backends.kernels.prefill import PrefillBatch, PrefillPlan, prefill_batch, prefill_into, prefill_plan
from attention_backends.registry import register_backend

QUERY_RANK = 0  # holds the KV of query and generated tokens


class RankGroup(Protocol):
    """What the backend needs from the ranks it runs with (`distributed/star_group.py` implements it)."""

    rank: int
    world_size: int

    def check(self) -> None:
        """Raise BackendUnavailable if the group can no longer run a step."""

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

    def encoded_anchor(self, rank: int, start: int) -> bool:
        """Whether a worker rank has encoded the anchor before a chunk starting at `start`: it does so with its first
        context block, block `rank`, which the chunks before `start` reached if they passed its start."""
        return rank != QUERY_RANK and rank * self.block < min(start, self.context_len)

    def rows(self, rank: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions rank `rank` runs of the chunk `[start, end)`, and which of them it writes to its cache:
        its context blocks (behind the anchor, on a rank that has not encoded it yet) and every query row."""
        pos = torch.arange(start, end)
        query = pos >= self.context_len
        mine = (self.owner(pos) == rank) & ~query
        if rank != QUERY_RANK and not self.encoded_anchor(rank, start) and bool(mine.any()):
            pos = torch.cat([torch.arange(self.anchor), pos])
            query = torch.cat([torch.zeros(self.anchor, dtype=torch.bool), query])
            mine = torch.cat([torch.ones(self.anchor, dtype=torch.bool), mine])
        keep = mine | query
        return pos[keep], (mine | (query & (rank == QUERY_RANK)))[keep]

    def blocks_written(self, rank: int, start: int, end: int, cache_block: int) -> set[int]:
        """Block-table entries rank `rank` writes for the chunk: all a worker allocates for it."""
        pos, writes = self.rows(rank, start, end)
        return set((pos[writes] // cache_block).tolist())


@dataclass(frozen=True, slots=True)
class Segment:
    """A run of rows at consecutive positions `[start, start + length)` of one context block, or of query rows:
    they see the keys `[0, sinks)` and, causally, those from `lo` on."""

    offset: int  # the run's first row among the rows it was cut from
    start: int
    length: int
    sinks: int
    lo: int


def segments(pos: torch.Tensor, lay: StarLayout) -> list[Segment]:
    """`pos` (ascending positions of the rows a rank runs) cut into runs that share what they see: block 0 and the
    query attend causally to everything before them; a context token of block i >= 1 to the anchor and its block."""
    if not len(pos):
        return []
    kind = torch.where(pos < lay.context_len, pos // lay.block, -1)
    breaks = ((kind.diff() != 0) | (pos.diff() != 1)).nonzero().squeeze(1) + 1
    bounds = [0, *breaks.tolist(), len(pos)]
    out = []
    for s, e in zip(bounds, bounds[1:]):
        block = int(kind[s])
        sinks, lo = (lay.anchor, block * lay.block) if block > 0 else (0, 0)
        out.append(Segment(s, int(pos[s]), e - s, sinks, lo))
    return out


@dataclass(frozen=True, slots=True)
class Shard:
    """One sharded sequence's phase-2 rows `[start, end)`: this rank's KV blocks and which keys each row sees."""

    start: int
    end: int
    blocks: torch.Tensor
    visible: torch.Tensor  # [rows, blocks * block_size]


@dataclass(frozen=True, slots=True)
class StarMeta:
    # Runs of packed rows at consecutive positions: of one context block (phase 1: the anchor, then the block
    # causally), or of query rows on one rank (everything before them, causally); read from the cache.
    segments: PrefillBatch
    decode: DecodeRows | None  # unsharded decodes: exact
    shards: list[Shard]
    write: torch.Tensor | None  # the batch rows whose K/V this rank keeps; None: all


@register_backend
class StarBackend(AttentionBackend[StarMeta]):
    name = "star"
    Params = StarParams
    # Context KV differs from dense and depends on the request's context/query split, which the prefix cache
    # cannot see in the tokens.
    capabilities = Capabilities(prefix_caching=False)
    chat_query_param = "query_tokens"

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

    def select_rows(self, step: SeqStep[StarParams, None]) -> torch.Tensor | None:
        lay = self.layout(step.params, step.prompt_len)
        if not lay.sharded:
            return None
        self.group.check()
        return lay.rows(self.rank, step.num_computed_tokens, step.end)[0]

    def prepare(self, batch: BackendBatch[StarMeta]) -> StarMeta:
        segments: list[tuple[int, torch.Tensor, PrefillPlan]] = []
        decodes, shards, writes = [], [], []
        for seq in batch.seqs:
            lay = self.layout(seq.params, seq.prompt_len)
            if lay.sharded:
                pos, write = lay.rows(self.rank, seq.num_computed_tokens, seq.end)
            else:
                pos = torch.arange(seq.num_computed_tokens, seq.context_len)
                write = torch.ones(len(pos), dtype=torch.bool)
            writes.append(write)
            if seq.phase is Phase.DECODE and not lay.sharded:
                decodes.append(seq)
                continue
            n_ctx = int((pos < lay.context_len).sum()) if lay.sharded else len(pos)
            segments += self._segments(seq, pos[:n_ctx], lay)
            if n_ctx < len(pos):
                shards.append(self._shard(seq, pos, n_ctx, lay))
        write = torch.cat(writes) if writes else torch.zeros(0, dtype=torch.bool)
        group = self.spec.num_heads // self.spec.num_kv_heads
        return StarMeta(prefill_batch(segments, group, self.kv.device, self.kv.num_blocks),
                        exact_decode(decodes, self.spec, self.kv), shards,
                        None if bool(write.all()) else write.nonzero().squeeze(1))

    def _segments(self, seq: SeqStep, pos: torch.Tensor, lay: StarLayout) -> list[tuple[int, torch.Tensor,
                                                                                      PrefillPlan]]:
        """The runs of `pos` in one context block, or of query rows, as chunks (first row, block table, plan)."""
        dtype, device = self.kv.spec.dtype, self.kv.device
        return [(seq.query_start + s.offset, seq.block_table,
                 prefill_plan(s.start, s.length, sinks=s.sinks, lo=s.lo, dtype=dtype, device=device))
                for s in segments(pos, lay)]

    def _shard(self, seq: SeqStep, pos: torch.Tensor, n_ctx: int, lay: StarLayout) -> Shard:
        qpos = pos[n_ctx:]
        bs = self.spec.block_size
        keys = torch.arange(int(qpos[-1]) + 1)
        mine = keys[lay.owner(keys) == self.rank]
        blocks = torch.unique(mine // bs)
        kpos = (blocks.unsqueeze(1) * bs + torch.arange(bs)).flatten()
        visible = (lay.owner(kpos) == self.rank) & (kpos.unsqueeze(0) <= qpos.unsqueeze(1))
        return Shard(seq.query_start + n_ctx, seq.query_start + len(pos), seq.block_table[blocks], visible)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: BackendBatch[StarMeta],
                scale: float) -> torch.Tensor:
        meta, kc, vc = batch.meta, self.kv.k[layer], self.kv.v[layer]
        if meta.write is None:
            self.store_kv(layer, k, v, batch.slot_mapping)
        else:
            keep = meta.write
            write_kv(kc, vc, k[:, keep].transpose(0, 1), v[:, keep].transpose(0, 1), batch.slot_mapping[keep])
        out = torch.empty_like(q)
        prefill_into(out, q, None, None, kc, vc, meta.segments, scale)
        if meta.decode is not None:
            attend_decode(out, q, kc, vc, meta.decode.rows, meta.decode.plans[None], scale)
        if meta.shards:
            self._merge_shards(layer, q, meta.shards, scale, out)
        return out

    def _merge_shards(self, layer: int, q: torch.Tensor, shards: list[Shard], scale: float, out: torch.Tensor
                      ) -> None:
        """Every rank's (output, LSE) over the KV it holds, gathered and merged: exact attention over all ranks."""
        parts = []
        for sh in shards:
            kb, vb = (take_blocks(c, sh.blocks).flatten(0, 1).transpose(0, 1) for c in (self.kv.k[layer],
                                                                                         self.kv.v[layer]))
            o, lse = attention_with_lse(q[:, sh.start : sh.end], kb, vb, sh.visible, scale)
            parts.append(torch.cat([o, lse.unsqueeze(-1)], dim=-1))
        gathered = self.group.all_gather(torch.cat(parts, dim=1))  # [world, H_q, rows, D + 1]
        merged, _ = merge_attention_states(gathered[..., :-1], gathered[..., -1])
        row = 0
        for sh in shards:
            n = sh.end - sh.start
            out[:, sh.start : sh.end] = merged[:, row : row + n].to(out.dtype)
            row += n

    def blocks_to_release(self, step: SeqStep[StarParams, None]) -> list[int]:
        """Sharded: rank 0 gives back the table entries of other ranks' context blocks (it never writes them); a
        worker drops the anchor it encoded once the whole context is encoded, in the step that completes it."""
        lay = self.layout(step.params, step.prompt_len)
        if not lay.sharded:
            return []
        bs, start, end, ctx = self.spec.block_size, step.num_computed_tokens, step.end, lay.context_len
        if self.rank == QUERY_RANK:
            return [j for j in range(min(start, ctx) // bs, min(end, ctx) // bs)
                    if (j * bs // lay.block) % lay.world != QUERY_RANK]
        if start < ctx <= end and lay.encoded_anchor(self.rank, end):
            return list(range(lay.anchor // bs))
        return []
