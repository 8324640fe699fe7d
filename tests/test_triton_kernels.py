"""Each Triton kernel against its PyTorch reference op, on this CPU under the interpreter (`TRITON_INTERPRET=1`,
set by conftest): ragged lengths, shuffled block tables holding the null block, GQA 1/3/4, head_dim 64 and 128,
windows under a block, sinks overlapping the window, 1-3 splits, chunk starts off the 16-token grid; float32 to
1e-5 and float16 to 2e-3. Sizes stay small: the interpreter costs about 12 ms per inner-loop iteration."""

from __future__ import annotations

import pytest
import torch

from attention_backends.kernels import block_sparse, triton_decode
from attention_backends.kernels.block_sparse import Selection, compress, sparse_prefill
from attention_backends.kernels.decode import decode_plan, paged_decode
from attention_backends.kernels.merge import merge_attention_states
from attention_backends.kernels.paged import context_slots, write_kv
from attention_backends.kernels.prefill import prefill_batch, prefill_into, prefill_plan
from attention_backends.kernels.slots import slot_attention

pytest.importorskip("triton")

BS, NB, HKV = 16, 40, 2
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def filled(lengths, group, d, dtype, seed=0):
    """A cache whose block 0 (the null block) holds garbage, sequences in shuffled blocks, and queries."""
    g = torch.Generator().manual_seed(seed)
    kc = torch.randn(NB, BS, HKV, d, generator=g).to(dtype)
    vc = torch.randn(NB, BS, HKV, d, generator=g).to(dtype)
    free = (torch.randperm(NB - 1, generator=g) + 1).tolist()
    tables = []
    for n in lengths:
        table = torch.tensor([free.pop() for _ in range(-(-n // BS))])
        k, v = (torch.randn(n, HKV, d, generator=g).to(dtype) for _ in range(2))
        write_kv(kc, vc, k, v, context_slots(table, 0, n, BS))
        tables.append(table)
    return kc, vc, tables, g


def same(got, want, dtype):
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


DECODE = [  # (group, head_dim, dtype, sinks, windows, splits)
    (1, 64, torch.float32, None, None, 1),
    (3, 64, torch.float32, None, None, 3),
    (4, 128, torch.float32, [0, 3, 20], [8, 5, 100], 2),
    (3, 64, torch.float32, [4, 2, 40], [None, 10, 30], 3),  # sinks overlapping the window
    (4, 64, torch.float16, [0, 3, 20], [8, 5, 100], 1),
    (1, 128, torch.float16, None, None, 2),
]


@pytest.mark.parametrize(("group", "d", "dtype", "sinks", "windows", "splits"), DECODE)
def test_paged_decode(monkeypatch, group, d, dtype, sinks, windows, splits):
    lengths = [1, 17, 200]
    kc, vc, tables, g = filled(lengths, group, d, dtype)
    q = torch.randn(len(lengths), HKV * group, d, generator=g).to(dtype)
    monkeypatch.setenv("LONGSERVE_KERNELS", "torch")
    want = paged_decode(q, kc, vc, decode_plan(tables, lengths, BS, sinks, windows), d**-0.5)
    monkeypatch.setenv("LONGSERVE_KERNELS", "triton")
    plan = decode_plan(tables, lengths, BS, sinks, windows, num_blocks=NB)
    got = triton_decode.paged_decode(q, kc, vc, plan.block_tables, plan.ranges, plan.max_keys, d**-0.5, splits,
                                     block_n=32)
    same(got, want, dtype)


def test_paged_decode_with_a_keep_mask(monkeypatch):
    """TCA's kept tokens: keys before a row's sinks' end seen only where the KV head kept them (row 2: none)."""
    lengths, sinks, windows = [17, 100, 200], [10, 60, 150], [7, 40, 50]
    kc, vc, tables, g = filled(lengths, 3, 64, torch.float32)
    keep = torch.rand(NB, BS, HKV, generator=g) < 0.5
    keep[tables[2]] = False
    q = torch.randn(len(lengths), HKV * 3, 64, generator=g)
    monkeypatch.setenv("LONGSERVE_KERNELS", "torch")
    want = paged_decode(q, kc, vc, decode_plan(tables, lengths, BS, sinks, windows), 0.125, keep)
    monkeypatch.setenv("LONGSERVE_KERNELS", "triton")
    plan = decode_plan(tables, lengths, BS, sinks, windows, num_blocks=NB)
    got = triton_decode.paged_decode(q, kc, vc, plan.block_tables, plan.ranges, plan.max_keys, 0.125, 2,
                                     block_n=32, keep=keep)
    same(got, want, torch.float32)


PREFILL = [  # (group, head_dim, dtype, chunks as (cached, length, sinks, lo, window))
    (3, 64, torch.float32, [(0, 40, 0, 0, None), (37, 29, 0, 0, None)]),
    (4, 64, torch.float32, [(100, 60, 20, 0, 64), (9, 30, 3, 0, 5)]),  # window under a block; start 9
    (1, 128, torch.float32, [(10, 50, 40, 0, 30)]),  # sinks overlapping the window
    (3, 64, torch.float32, [(70, 25, 32, 64, None), (0, 33, 0, 0, None)]),  # Star: anchor + own block
    (4, 64, torch.float16, [(37, 29, 0, 0, None), (100, 60, 20, 0, 64)]),
]


def test_prefill_with_a_keep_mask(monkeypatch):
    """Sink keys seen only where their KV head kept them (TCA's front, SWAA's sinks), two chunks in one launch."""
    chunks = [(100, 40, 64, 64, None), (60, 30, 20, 0, 16)]
    kc, vc, tables, g = filled([c + t for c, t, *_ in chunks], 3, 64, torch.float32)
    keep = torch.rand(NB, BS, HKV, generator=g) < 0.5
    total = sum(t for _, t, *_ in chunks)
    q = torch.randn(HKV * 3, total, 64, generator=g)
    outs = {}
    for kernels in ("torch", "triton"):
        monkeypatch.setenv("LONGSERVE_KERNELS", kernels)
        rows, batch = 0, []
        for (c, t, sinks, lo, window), table in zip(chunks, tables):
            batch.append((rows, table, prefill_plan(c, t, sinks=sinks, lo=lo, window=window)))
            rows += t
        outs[kernels] = torch.empty_like(q)
        prefill_into(outs[kernels], q, None, None, kc, vc, prefill_batch(batch, 3, num_blocks=NB), 0.125, keep)
    same(outs["triton"], outs["torch"], torch.float32)


@pytest.mark.parametrize(("group", "d", "dtype", "chunks"), PREFILL)
def test_prefill_chunks_in_one_launch(monkeypatch, group, d, dtype, chunks):
    kc, vc, tables, g = filled([c + t for c, t, *_ in chunks], group, d, dtype)
    total = sum(t for _, t, *_ in chunks)
    q = torch.randn(HKV * group, total, d, generator=g).to(dtype)
    rows = [sum(t for _, t, *_ in chunks[:i]) for i in range(len(chunks))]
    outs = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv("LONGSERVE_KERNELS", mode)
        plans = [prefill_plan(c, t, sinks=s, lo=lo, window=w, dtype=dtype) for c, t, s, lo, w in chunks]
        batch = prefill_batch(list(zip(rows, tables, plans)), group, num_blocks=NB)
        outs[mode] = torch.zeros_like(q)
        prefill_into(outs[mode], q, None, None, kc, vc, batch, d**-0.5)
    same(outs["triton"], outs["torch"], dtype)


@pytest.mark.parametrize(("group", "d", "dtype", "per_head"), [(3, 64, torch.float32, False), (4, 128, torch.float32,
                                                                True), (3, 64, torch.float16, True)])
def test_slot_attention(monkeypatch, group, d, dtype, per_head):
    kc, vc, tables, g = filled([90, 33], group, d, dtype)
    sets, rows, m = HKV * (group if per_head else 1), 3, 40
    slots = torch.stack([context_slots(tables[i % 2], 0, 33, BS)[torch.randint(0, 33, (sets, m), generator=g)]
                         for i in range(rows)], 1)
    visible = torch.rand(sets, rows, m, generator=g) < 0.7
    visible[..., 0] = True
    q = torch.randn(HKV * group, rows, d, generator=g).to(dtype)
    monkeypatch.setenv("LONGSERVE_KERNELS", "torch")
    want = slot_attention(q, kc, vc, slots, visible, d**-0.5)
    monkeypatch.setenv("LONGSERVE_KERNELS", "triton")
    same(slot_attention(q, kc, vc, slots, visible, d**-0.5), want, dtype)


@pytest.mark.parametrize(("group", "dtype", "start"), [(3, torch.float32, 0), (4, torch.float32, 101),
                                                       (3, torch.float16, 70)])
def test_block_sparse_prefill(monkeypatch, group, dtype, start):
    d, n = 64, 230
    kc, vc, (table,), g = filled([n], group, d, dtype)
    sel = Selection(BS, 32, 32, 16, 1, 1, 4)
    means = kc[table[: n // BS]].float().mean(1)
    q = torch.randn(HKV * group, n - max(start, sel.k * sel.block - 1), d, generator=g).to(dtype)
    first = n - q.shape[1]
    outs = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv("LONGSERVE_KERNELS", mode)
        monkeypatch.setattr(block_sparse, "TILE_ELEMS", 1 << 12)  # several tiles of query groups
        outs[mode] = sparse_prefill(kc, vc, q, first, table, compress(means, sel), sel, d**-0.5)
    same(outs["triton"], outs["torch"], dtype)


def test_merge_handles_empty_shards_and_rows(monkeypatch):
    g = torch.Generator().manual_seed(3)
    outs, lses = torch.randn(3, 40, 64, generator=g), torch.randn(3, 40, generator=g) * 30
    lses[1, :10] = float("-inf")  # one shard empty for some rows
    lses[:, 10:13] = float("-inf")  # rows no shard sees
    monkeypatch.setenv("LONGSERVE_KERNELS", "torch")
    want = merge_attention_states(outs, lses)
    monkeypatch.setenv("LONGSERVE_KERNELS", "triton")
    got = merge_attention_states(outs, lses)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1].isinf(), want[1].isinf())
    torch.testing.assert_close(got[1][~want[1].isinf()], want[1][~want[1].isinf()], atol=1e-5, rtol=1e-5)


def test_out_of_range_ids_are_refused_before_a_launch(monkeypatch):
    monkeypatch.setenv("LONGSERVE_KERNELS", "triton")
    with pytest.raises(IndexError, match="block ids out of range"):
        decode_plan([torch.tensor([3, NB])], [20], BS, num_blocks=NB)
    kc, vc, _, g = filled([20], 1, 64, torch.float32)
    slots, visible = torch.tensor([[[0, NB * BS]]] * 2), torch.ones(2, 1, 2, dtype=torch.bool)
    with pytest.raises(IndexError, match="slots out of range"):
        slot_attention(torch.randn(2, 1, 64), kc, vc, slots, visible, 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        slot_attention(torch.randn(2, 3, 64), kc, vc, slots, visible, 1.0)
