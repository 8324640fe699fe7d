"""InfLLM-V2's block selection and block-sparse attention over the paged cache (PyTorch reference ops; on the CPU,
a step's decodes select their blocks in one C++ call and attend through the C++ paged decode, on CUDA through the
Triton slot-list kernel).

Compressed keys come from per-page key means (one vector per cache block and KV head, kept in a side
table): a tier-1 key is the mean of the keys in a window of `kernel` tokens at stride `stride`, which is the
mean of the page means it spans when both are multiples of the page size. Tier 2 (4x kernel and stride)
only estimates each query's softmax normaliser.

Selection runs per *query group*: the step's queries that fall in one selection block. The group's score of
a block is the probability mass its queries (summed over the heads of a KV group) put on the tier-1 keys
that overlap the block, each query seeing only keys that end at or before its position. Init and local
blocks are forced in; the group attends to `k` blocks, its own (current) block last, causal inside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attention_backends.kernels import cpu_ext
from attention_backends.kernels.decode import DecodePlan, paged_decode
from attention_backends.kernels.dispatch import check_ids, use_cpp, use_triton
from attention_backends.kernels.paged import gather_head_slots, padded_tables, row_index, sdpa, take_blocks
from attention_backends.kernels.slots import slot_attention

COARSE = 4  # tier 2's kernel and stride are this multiple of tier 1's, as in the reference
TILE_ELEMS = 1 << 23  # gathered K elements per prefill tile of query groups (32 MiB in float32)


@dataclass(frozen=True, slots=True)
class Selection:
    page: int  # cache block size
    block: int  # selection block, tokens
    kernel: int  # tier-1 kernel and stride, tokens
    stride: int
    init_blocks: int
    local_blocks: int  # blocks before the current one that are always attended
    k: int  # blocks attended per query group, the forced ones included

    @property
    def pages_per_block(self) -> int:
        return self.block // self.page


@dataclass(frozen=True, slots=True)
class Compressed:
    """One sequence's compressed keys for one layer: tier 1 and tier 2, with the last position each covers."""

    fine: torch.Tensor  # [n1, H_kv, D]
    fine_last: torch.Tensor  # [n1]
    coarse: torch.Tensor  # [n2, H_kv, D]
    coarse_last: torch.Tensor  # [n2]


@dataclass(frozen=True, slots=True)
class SparseRow:
    """One sequence's rows `[row, row + length)` of the packed batch, at positions `[start, start + length)`, that
    attend block-sparsely; `block_table` holds at least the blocks of positions up to the last row."""

    row: int
    block_table: torch.Tensor
    start: int
    length: int


@dataclass(frozen=True, slots=True)
class SparsePlan:
    """A step's block-sparse rows, planned once for every layer (`sparse_plan`): prefill chunks, and decodes (one
    query each) with what the C++ kernels read for them (None: the reference ops run)."""

    chunks: tuple[SparseRow, ...]
    decodes: tuple[SparseRow, ...]
    at: slice | torch.Tensor  # the decodes' rows of the step's batch
    tables: torch.Tensor | None  # [B, N] int32: the decodes' block tables, null-padded
    positions: torch.Tensor | None  # [B] int32
    ranges: torch.Tensor | None  # [3, B] int32: the keys of its selected blocks each decode sees (paged decode's)


def sparse_plan(rows: Sequence[SparseRow], sel: Selection, device: torch.device | str = "cpu") -> SparsePlan:
    """Plan a step's block-sparse `rows` under `sel` for the kernels that run on `device`."""
    chunks, decodes = tuple(r for r in rows if r.length > 1), tuple(r for r in rows if r.length == 1)
    where = row_index([r.row for r in decodes])
    if not decodes or use_triton(device) or not use_cpp(device):
        return SparsePlan(chunks, decodes, where, None, None, None)
    tables = padded_tables([r.block_table for r in decodes], torch.int32)
    # Every selected block before the current one is full; the current one is visible up to the query.
    seen = [(sel.k - 1) * sel.block + r.start % sel.block + 1 for r in decodes]
    ranges = torch.tensor([seen, [0] * len(seen), [0] * len(seen)], dtype=torch.int32)
    return SparsePlan(chunks, decodes, where, tables, torch.tensor([r.start for r in decodes], dtype=torch.int32),
                      ranges)


def _pool(means: torch.Tensor, kernel: int, stride: int, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    kp, sp = kernel // page, stride // page
    n = (means.shape[0] - kp) // sp + 1 if means.shape[0] >= kp else 0
    last = torch.arange(n) * stride + kernel - 1
    if n == 0:
        return means.new_zeros((0, *means.shape[1:])), last
    return means[: (n - 1) * sp + kp].unfold(0, kp, sp).mean(-1), last


def page_means(k_cache: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """The float32 key means `[n, H_kv, D]` of full cache blocks `pages` `[n]`, the rows of a means table."""
    return k_cache[pages].float().mean(1)


def compress(means: torch.Tensor, sel: Selection) -> Compressed:
    """`means` `[N, H_kv, D]`: the key means of a sequence's first N (full) pages."""
    fine, fine_last = _pool(means, sel.kernel, sel.stride, sel.page)
    coarse, coarse_last = _pool(means, COARSE * sel.kernel, COARSE * sel.stride, sel.page)
    return Compressed(fine, fine_last, coarse, coarse_last)


def kernel_probs(q: torch.Tensor, qpos: torch.Tensor, c: Compressed, scale: float) -> torch.Tensor:
    """Stage 1: q `[H_q, T, D]` at positions `qpos` -> `[H_kv, T, n]`, each query's probabilities on the tier-1
    keys it can see, normalised by the tier-2 logsumexp and summed over the query heads of a KV group. Only the
    first n tier-1 keys, those the last query can see, are scored; a caller pads the rest with zeros."""
    hkv = c.fine.shape[1]
    hq, t, d = q.shape
    qg = q.reshape(hkv, hq // hkv * t, d).float() * scale
    top, bottom = int(qpos.max()), int(qpos.min())

    def logits(keys: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        n = int((last <= top).sum())
        s = (qg @ keys[:n].permute(1, 2, 0)).view(hkv, hq // hkv, t, n)
        lo = int((last[:n] <= bottom).sum())  # keys every query sees need no mask
        if lo < n:
            s[..., lo:].masked_fill_((last[None, lo:n] > qpos[:, None]).to(s.device), float("-inf"))
        return s

    fine = logits(c.fine, c.fine_last)
    lse = torch.logsumexp(logits(c.coarse, c.coarse_last), -1)
    if not bool(torch.isfinite(lse).all()):
        # Queries that see no tier-2 key yet are normalised by their tier-1 keys; those that see none score 0.
        lse = torch.where(torch.isfinite(lse), lse, torch.logsumexp(fine, -1)).nan_to_num(neginf=0.0)
    return fine.sub_(lse.unsqueeze(-1)).exp_().sum(1)


def select_blocks(probs: torch.Tensor, cur: torch.Tensor, sel: Selection) -> torch.Tensor:
    """probs `[H_kv, M, n1]` of M query groups whose current blocks are `cur` `[M]` -> the `[H_kv, M, k]` block
    indices each attends to, ascending (so the current block comes last). Needs `cur >= k - 1` throughout."""
    a, r = sel.kernel // sel.stride, sel.block // sel.stride
    nb = int(cur.max()) + 1
    # Block j's score is the max over the tier-1 keys overlapping it: entries [r*j - a + 1, r*j + r - 1].
    need = (nb - 1) * r + r + a - 1
    padded = F.pad(probs, (a - 1, max(0, need - (a - 1) - probs.shape[-1])))[..., :need]
    scores = padded.unfold(-1, r + a - 1, r).amax(-1)
    j = torch.arange(nb, device=scores.device)
    cur = cur.to(scores.device).unsqueeze(1)
    forced = (j < sel.init_blocks) | ((j >= cur - sel.local_blocks) & (j <= cur))
    scores = scores.masked_fill(forced, float("inf")).masked_fill(j > cur, float("-inf"))
    # Adjacent blocks share the tier-1 keys that straddle them, so exact ties are common: the stable sort breaks
    # them towards the earlier block, the same way on every device.
    return scores.sort(dim=-1, descending=True, stable=True).indices[..., : sel.k].sort(-1).values


def page_slots(pages: torch.Tensor, page: int) -> torch.Tensor:
    """Cache blocks `[..., n]` -> the slots of their tokens `[..., n * page]`."""
    return (pages.unsqueeze(-1) * page + torch.arange(page)).flatten(-2)


def block_pages(blocks: torch.Tensor, table: torch.Tensor, sel: Selection) -> torch.Tensor:
    """Selection-block indices `[..., k]` -> the cache block ids holding them `[..., k * pages_per_block]`;
    `table` is padded with the null block past the sequence's last page."""
    ppb = sel.pages_per_block
    return table[(blocks.unsqueeze(-1) * ppb + torch.arange(ppb)).flatten(-2)]


def padded_table(table: torch.Tensor, num_blocks: int, sel: Selection) -> torch.Tensor:
    out = torch.zeros(num_blocks * sel.pages_per_block, dtype=torch.long)
    n = min(len(table), len(out))
    out[:n] = table[:n]
    return out


def causal_tail_mask(sel: Selection, dtype: torch.dtype) -> torch.Tensor:
    """`[block, k * block]` additive mask of one query group over its k blocks: causal in the last one."""
    b = sel.block
    visible = torch.ones(b, sel.k * b, dtype=torch.bool)
    visible[:, -b:] = torch.ones(b, b, dtype=torch.bool).tril()
    return torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))


def sparse_prefill(k_cache: torch.Tensor, v_cache: torch.Tensor, q: torch.Tensor, start: int, table: torch.Tensor,
                   c: Compressed, sel: Selection, scale: float) -> torch.Tensor:
    """Queries q `[H_q, T, D]` at positions `start..start+T-1` (every one at or past block k - 1), whose keys
    are all in the cache -> `[H_q, T, D]`. Query groups run in tiles that bound the gathered K/V; with the
    Triton kernel, selection runs in those tiles and attention in one launch; on the CPU the C++ prefill reads each
    group's blocks in place."""
    hq, t, d = q.shape
    b, hkv = sel.block, c.fine.shape[1]
    m0, m1 = start // b, (start + t - 1) // b + 1
    table = padded_table(table, m1, sel)
    triton_pages = [] if use_triton(q.device) else None
    if triton_pages is not None:
        check_ids(table, k_cache.shape[0], "block ids")
    ext = cpu_ext.load() if triton_pages is None and use_cpp(q.device) else None
    mask = causal_tail_mask(sel, q.dtype)
    tile = max(1, TILE_ELEMS // (hkv * sel.k * b * d))
    out = torch.empty_like(q)
    for ma in range(m0, m1, tile):
        mb = min(m1, ma + tile)
        r0, r1 = max(start, ma * b) - start, min(start + t, mb * b) - start
        qpos = torch.arange(start + r0, start + r1)
        probs = kernel_probs(q[:, r0:r1], qpos, c, scale)
        groups = torch.zeros(hkv, mb - ma, probs.shape[-1], device=probs.device)
        groups.index_add_(1, (qpos // b - ma).to(probs.device), probs)
        pages = block_pages(select_blocks(groups, torch.arange(ma, mb), sel).cpu(), table, sel)  # [H_kv, M, n]
        if triton_pages is not None:
            triton_pages.append(pages)
            continue
        if ext is not None:
            # A group's selected blocks, its own last, are a block table per KV head over which its queries are
            # causal from position (k - 1) * block + their offset in the block: the C++ prefill reads them in place.
            tables = pages.to(torch.int32).transpose(0, 1).contiguous()  # [M, H_kv, n]
            for m in range(mb - ma):
                g0, g1 = max(start, (ma + m) * b) - start, min(start + t, (ma + m + 1) * b) - start
                ext.paged_prefill(out[:, g0:g1], q[:, g0:g1], k_cache, v_cache, tables[m],
                                  (sel.k - 1) * b + (start + g0) % b, 0, 0, -1, scale)
            continue
        k, v = (x.transpose(0, 1) for x in gather_head_slots(k_cache, v_cache, page_slots(pages, sel.page)))
        qpad = q.new_zeros(hq, (mb - ma) * b, d)
        qpad[:, qpos - ma * b] = q[:, r0:r1]
        o = sdpa(qpad.view(hq, mb - ma, b, d).transpose(0, 1), k, v, scale, mask=mask)
        out[:, r0:r1] = o.transpose(0, 1).reshape(hq, -1, d)[:, qpos - ma * b]
    if triton_pages is not None:
        from attention_backends.kernels import triton_block_sparse

        return triton_block_sparse.attend(q, k_cache, v_cache, torch.cat(triton_pages, 1), start, m0, b, sel.k, scale)
    return out


def sparse_decode(k_cache: torch.Tensor, v_cache: torch.Tensor, q: torch.Tensor, pages: torch.Tensor,
                  plan: SparsePlan, sel: Selection, scale: float) -> torch.Tensor:
    """The plan's decodes, q `[B, H_q, D]`, over the cache blocks `pages` `[B, H_kv, k * pages_per_block]` of their
    selected blocks (current block last) -> `[B, H_q, D]`."""
    if plan.ranges is not None:
        # A KV head's selected pages are a block table whose keys are visible up to the current block's last
        # written one: the C++ paged decode reads them in place, a table per row and KV head.
        return paged_decode(q, k_cache, v_cache, DecodePlan(pages, ranges=plan.ranges, kernel="cpp"), scale)
    b, pos = sel.block, torch.tensor([r.start for r in plan.decodes])
    tail = (pos // b * b).unsqueeze(1) + torch.arange(b)  # positions of the current block's keys
    visible = torch.cat([torch.ones(len(pos), (sel.k - 1) * b, dtype=torch.bool), tail <= pos.unsqueeze(1)], 1)
    slots = page_slots(pages.transpose(0, 1), sel.page)
    return slot_attention(q.transpose(0, 1), k_cache, v_cache, slots, visible.expand(slots.shape[0], -1, -1),
                          scale).transpose(0, 1)


def decode_pages(q: torch.Tensor, means: torch.Tensor, plan: SparsePlan, sel: Selection, scale: float
                 ) -> torch.Tensor:
    """The `[B, H_kv, k * pages_per_block]` cache blocks each of the plan's decodes attends to, its query the row's
    `[H_q, D]` of q `[B, H_q, D]`; `means` as in `attend_block_sparse`. On the CPU in one C++ call
    (`csrc/block_select.cpp`), else row by row through the ops above."""
    if plan.tables is not None:
        return cpu_ext.load().select_decode_pages(q.float().contiguous(), means, plan.tables, plan.positions,
                                                  sel.page, sel.block, sel.kernel, sel.stride, sel.init_blocks,
                                                  sel.local_blocks, sel.k, scale)
    pages = []
    for i, r in enumerate(plan.decodes):
        c = compress(take_blocks(means, r.block_table[: (r.start + 1) // sel.page]), sel)
        probs = kernel_probs(q[i].unsqueeze(1), torch.tensor([r.start]), c, scale)
        cur = torch.tensor([r.start // sel.block])
        blocks = select_blocks(probs, cur, sel)[:, 0].cpu()
        pages.append(block_pages(blocks, padded_table(r.block_table, int(cur) + 1, sel), sel))
    return torch.stack(pages)


def attend_block_sparse(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        means: torch.Tensor, plan: SparsePlan, sel: Selection, scale: float) -> None:
    """The plan's rows of `out` `[H_q, T, D]` from `q` over the cache, whose keys (the rows' own included) are all
    written; `means` `[num_blocks, H_kv, D]` holds the key means of at least the rows' full pages. Prefill chunks run
    one by one, decodes in one batch."""
    for r in plan.chunks:
        c = compress(take_blocks(means, r.block_table[: (r.start + r.length) // sel.page]), sel)
        out[:, r.row : r.row + r.length] = sparse_prefill(k_cache, v_cache, q[:, r.row : r.row + r.length], r.start,
                                                          r.block_table, c, sel, scale)
    if plan.decodes:
        qd = q[:, plan.at].transpose(0, 1).contiguous()
        pages = decode_pages(qd, means, plan, sel, scale)
        out[:, plan.at] = sparse_decode(k_cache, v_cache, qd, pages, plan, sel, scale).transpose(0, 1)
