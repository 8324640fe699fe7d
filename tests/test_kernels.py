"""The kernel layer over explicit caches: each reference op against an explicit masked reference, on longserve's
contiguous layout and on vLLM's (K and V fused per cell, head-major; on the CPU the keys of a block stored
transposed: the same logical `[num_blocks, block_size, H_kv, D]` with other strides), ragged lengths and shuffled
block tables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from backend_harness import huge_page_advised, masked_attention

from attention_backends.kernels.decode import DecodePlan, decode_plan, paged_decode
from attention_backends.kernels.huge_pages import HUGE_PAGE, back_with_huge_pages, huge_pages_possible, zeros
from attention_backends.kernels.paged import context_slots, gather_head_slots, gather_range, take_blocks, write_kv
from attention_backends.kernels.prefill import paged_prefill, prefill_plan
from attention_backends.kernels.ranges import RangeRow, attend_ranges, range_work
from attention_backends.kernels.slots import slot_attention
from attention_backends.kernels.topk import lowrank_topk_decode, topk_decode_plan
from longserve_vllm.layout import cache_views

BS, HQ, HKV, D, NB = 16, 6, 2, 16, 48
SCALE = D**-0.5


def caches(layout: str, d: int = D, bs: int = BS) -> tuple[torch.Tensor, torch.Tensor]:
    if layout == "contiguous":
        return torch.zeros(NB, bs, HKV, d), torch.zeros(NB, bs, HKV, d)
    cells = torch.zeros(NB, HKV, bs, 2 * d)  # vLLM's per-layer page: K and V in one cell per (head, token)
    return cache_views(cells, d, "vec" if layout == "vllm-cpu" else None)


def filled(layout: str, lengths: list[int], seed: int = 0, d: int = D, bs: int = BS):
    """Caches holding sequences of these lengths in shuffled blocks (never the null block 0), and their raw K/V."""
    g = torch.Generator().manual_seed(seed)
    kc, vc = caches(layout, d, bs)
    free = (torch.randperm(NB - 1, generator=g) + 1).tolist()
    seqs = []
    for n in lengths:
        table = torch.tensor([free.pop() for _ in range(-(-n // bs))])
        k, v = torch.randn(HKV, n, d, generator=g), torch.randn(HKV, n, d, generator=g)
        write_kv(kc, vc, k.transpose(0, 1), v.transpose(0, 1), context_slots(table, 0, n, bs))
        seqs.append((table, k, v))
    return kc, vc, seqs


LAYOUTS = ["contiguous", "vllm-cuda", "vllm-cpu"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reads_see_what_was_written(layout):
    kc, vc, [(table, k, v)] = filled(layout, [70])
    gk, gv = gather_range(kc, vc, table, 5, 61)
    assert torch.equal(gk, k[:, 5:61]) and torch.equal(gv, v[:, 5:61])
    slots = torch.tensor([[3, 40, 69], [0, 17, 18]])
    sk, sv = gather_head_slots(kc, vc, context_slots(table, 0, 70, BS)[slots])
    assert torch.equal(sk, torch.stack([k[h, slots[h]] for h in range(HKV)]))
    assert torch.equal(sv, torch.stack([v[h, slots[h]] for h in range(HKV)]))
    assert torch.equal(take_blocks(kc, table[1:3]).flatten(0, 1).transpose(0, 1), k[:, BS : 3 * BS])


@pytest.mark.parametrize("kernels", ["torch", "cpp"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_write_kv_stores_each_token_at_its_slot_and_skips_padding(monkeypatch, kernels, layout):
    monkeypatch.setenv("LONGSERVE_KERNELS", kernels)
    kc, vc = caches(layout)
    k, v = torch.randn(2, 5, HKV, D).unbind(0)
    slots = torch.tensor([3, 40, -1, 17, NB * BS - 1])  # -1: vLLM's padding, stored nowhere
    write_kv(kc, vc, k, v, slots)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(kc[slot // BS, slot % BS], k[t]) and torch.equal(vc[slot // BS, slot % BS], v[t])
    assert int((kc != 0).any(-1).sum()) == 4 * HKV  # nothing else written
    if kernels == "cpp":
        with pytest.raises(RuntimeError, match="past the cache"):
            write_kv(kc, vc, k, v, torch.tensor([0, 1, 2, 3, NB * BS]))


@pytest.mark.parametrize("kernels", ["torch", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_rotates_each_heads_keys_by_its_matrix(monkeypatch, kernels, dtype):
    monkeypatch.setenv("LONGSERVE_KERNELS", kernels)
    kc, vc = (c.to(dtype) for c in caches("vllm-cpu"))
    k, v = torch.randn(2, 40, HKV, D, dtype=torch.float64).unbind(0)  # more tokens than one parallel grain
    rotation = torch.linalg.qr(torch.randn(HKV, D, D, dtype=torch.float64))[0]
    slots = torch.randperm(NB * BS)[:40]
    slots[7] = -1
    write_kv(kc, vc, k.to(dtype), v.to(dtype), slots, rotation.to(dtype))
    kept = slots >= 0
    want = torch.einsum("thi,hij->thj", k.to(dtype).double(), rotation.to(dtype).double())
    torch.testing.assert_close(kc.flatten(0, 1)[slots[kept]], want[kept].to(dtype))  # summed in float32
    assert torch.equal(vc.flatten(0, 1)[slots[kept]], v.to(dtype)[kept])
    assert int((kc != 0).any(-1).sum()) == 39 * HKV


@pytest.mark.parametrize("kernels", ["torch", "cpp"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("sinks", "window"), [(None, None), ([0, 3, 20], [8, 5, 100]), ([4, 0, 2], [None, 30, 3])])
def test_decode_sees_sinks_and_its_window(monkeypatch, kernels, layout, sinks, window):
    monkeypatch.setenv("LONGSERVE_KERNELS", kernels)
    lengths = [1, 17, 600]  # the C++ kernel splits the longest row over two pieces of work
    kc, vc, seqs = filled(layout, lengths)
    q = torch.randn(len(lengths), HQ, D)
    plan = decode_plan([t for t, _, _ in seqs], lengths, BS, sinks, window, num_blocks=NB)
    assert plan.kernel == kernels
    got = paged_decode(q, kc, vc, plan, SCALE)
    for b, ((_, k, v), n) in enumerate(zip(seqs, lengths)):
        kpos = torch.arange(n)
        lo = max(0, n - window[b]) if window and window[b] is not None else 0
        visible = (kpos >= lo) | (kpos < (sinks[b] if sinks else 0))
        want = masked_attention(q[b][:, None], k, v, visible[None], SCALE)[:, 0]
        torch.testing.assert_close(got[b], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpp_decode_in_half_precision_matches_the_reference(monkeypatch, dtype):
    lengths = [5, 600]
    kc, vc, seqs = filled("vllm-cpu", lengths)
    kc, vc = kc.to(dtype), vc.to(dtype)  # contiguous copies: the D-contiguous key path in half precision
    q = torch.randn(len(lengths), HQ, D).to(dtype)
    outs = {}
    for kernels in ("torch", "cpp"):
        monkeypatch.setenv("LONGSERVE_KERNELS", kernels)
        outs[kernels] = paged_decode(q, kc, vc, decode_plan([t for t, _, _ in seqs], lengths, BS, [2, 2], [None, 64]),
                                     SCALE)
    torch.testing.assert_close(outs["cpp"].float(), outs["torch"].float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("layout", ["contiguous", "vllm-cpu"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq", [2, 6, 8, 10])
def test_cpp_decode_at_the_head_dims_it_compiles_for(monkeypatch, layout, d, dtype, hq):
    # 64 and 128 take the kernel's fixed-width loops (the other tests' head dim 16 takes the general ones); in float32
    # on longserve's layout, 1 to 4 query heads per KV head take its register-blocked loops, 5 the general ones.
    monkeypatch.setenv("LONGSERVE_KERNELS", "cpp")
    lengths = [3, 600]
    kc, vc, seqs = filled(layout, lengths, d=d)
    q = torch.randn(len(lengths), hq, d)
    kc, vc, q = kc.to(dtype), vc.to(dtype), q.to(dtype)
    got = paged_decode(q, kc, vc, decode_plan([t for t, _, _ in seqs], lengths, BS, [0, 5], [None, 300]), d**-0.5)
    for b, ((_, k, v), n) in enumerate(zip(seqs, lengths)):
        kpos = torch.arange(n)
        visible = (kpos >= max(0, n - 300)) | (kpos < 5) if b else kpos >= 0
        want = masked_attention(q[b].float()[:, None], k.to(dtype).float(), v.to(dtype).float(), visible[None],
                                d**-0.5)[:, 0]
        tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's own rounding
        torch.testing.assert_close(got[b].float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("hq", [2, 4, 6, 8])
def test_cpp_decode_on_vllm_cpu_pages_of_32_tokens(monkeypatch, hq):
    """vLLM's CPU cache with the plugin's 32-token pages: its transposed keys scored 32, 16 and fewer at a time (runs
    cut by sinks, a window and the sequence's end), 1 to 4 query heads per KV head in registers."""
    monkeypatch.setenv("LONGSERVE_KERNELS", "cpp")
    lengths, sinks, windows, bs, d = [7, 45, 600], [0, 3, 5], [None, None, 250], 32, 64
    kc, vc, seqs = filled("vllm-cpu", lengths, d=d, bs=bs)
    q = torch.randn(len(lengths), hq, d)
    got = paged_decode(q, kc, vc, decode_plan([t for t, _, _ in seqs], lengths, bs, sinks, windows), d**-0.5)
    for b, ((_, k, v), n) in enumerate(zip(seqs, lengths)):
        kpos = torch.arange(n)
        visible = (kpos < sinks[b]) | (kpos > n - 1 - (windows[b] or n))
        want = masked_attention(q[b, :, None], k, v, visible[None], d**-0.5)[:, 0]
        torch.testing.assert_close(got[b], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernels", ["torch", "cpp"])
@pytest.mark.parametrize("layout", ["contiguous", "vllm-cpu"])
def test_decode_with_a_keep_mask(monkeypatch, kernels, layout):
    """A keep mask (TCA's kept tokens) hides, per KV head, the keys before a row's sinks' end it does not hold; the
    band from the window's start is seen whole. Row 2 keeps none of its 700 front keys: the C++ kernel's first piece
    of it sees nothing, which its merge must weigh 0."""
    monkeypatch.setenv("LONGSERVE_KERNELS", kernels)
    lengths, sinks, windows, bs, d = [70, 600, 800], [30, 5, 700], [40, 300, 100], 32, 64
    kc, vc, seqs = filled(layout, lengths, d=d, bs=bs)
    keep = torch.rand(NB, bs, HKV, generator=torch.Generator().manual_seed(1)) < 0.5
    keep[seqs[2][0]] = False
    q = torch.randn(len(lengths), HQ, d)
    got = paged_decode(q, kc, vc, decode_plan([t for t, _, _ in seqs], lengths, bs, sinks, windows), d**-0.5, keep)
    for b, ((table, k, v), n) in enumerate(zip(seqs, lengths)):
        kpos = torch.arange(n)
        kept = keep[table].flatten(0, 1)[:n].T  # [H_kv, n]
        visible = ((kpos < sinks[b]) & kept) | (kpos >= n - windows[b])
        want = masked_attention(q[b, :, None], k, v, visible.repeat_interleave(HQ // HKV, 0)[:, None], d**-0.5)
        torch.testing.assert_close(got[b], want[:, 0], atol=1e-5, rtol=1e-5)


def test_decode_refuses_a_keep_mask_of_another_shape():
    kc, vc, [(table, _, _)] = filled("contiguous", [40])
    with pytest.raises(ValueError, match="keep must be a bool tensor"):
        paged_decode(torch.randn(1, HQ, D), kc, vc, decode_plan([table], [40], BS), SCALE, torch.ones(NB, BS))


@pytest.mark.parametrize("layout", ["contiguous", "vllm-cpu"])
@pytest.mark.parametrize("d", [16, 64])
def test_cpp_decode_through_a_table_per_kv_head(monkeypatch, layout, d):
    """Tables `[B, H_kv, N]`: each KV head of a row reads its own blocks (here another sequence's), under the row's
    sinks and window; the general and the register-blocked loops."""
    monkeypatch.setenv("LONGSERVE_KERNELS", "cpp")
    kc, vc, seqs = filled(layout, [120, 120, 120], d=d)
    heads = [(0, 1), (2, 0)]  # row b's KV head h reads sequence heads[b][h]
    lens, sinks, lo = [120, 77], [0, 4], [0, 30]
    tables = torch.stack([torch.stack([seqs[i][0] for i in row]) for row in heads]).to(torch.int32)
    plan = DecodePlan(tables, ranges=torch.tensor([lens, sinks, lo], dtype=torch.int32), kernel="cpp")
    q = torch.randn(len(heads), HQ, d)
    got = paged_decode(q, kc, vc, plan, d**-0.5)
    g = HQ // HKV
    for b, row in enumerate(heads):
        kpos = torch.arange(lens[b])
        visible = ((kpos < sinks[b]) | (kpos >= lo[b]))[None]
        for h, i in enumerate(row):
            _, k, v = seqs[i]
            want = masked_attention(q[b, h * g : (h + 1) * g, None], k[h : h + 1, : lens[b]], v[h : h + 1, : lens[b]],
                                    visible, d**-0.5)[:, 0]
            torch.testing.assert_close(got[b, h * g : (h + 1) * g], want, atol=1e-5, rtol=1e-5)


def test_cpp_decode_refuses_a_table_past_the_cache(monkeypatch):
    monkeypatch.setenv("LONGSERVE_KERNELS", "cpp")
    kc, vc, [(table, _, _)] = filled("contiguous", [40])
    plan = decode_plan([table], [40], BS)  # planned without num_blocks: the kernel checks the ids itself
    plan.block_tables[0, 1] = NB
    with pytest.raises(RuntimeError, match="block id out of range"):
        paged_decode(torch.randn(1, HQ, D), kc, vc, plan, SCALE)


PREFILL = {  # name: (cached tokens before the chunk, chunk, sinks, lo, window)
    "causal-from-0": (0, 40, 0, 0, None),
    "after-cache": (37, 29, 0, 0, None),
    "window-and-sinks": (100, 300, 20, 0, 64),
    "window-shorter-than-a-block": (9, 50, 3, 0, 5),
    "sinks-overlap-window": (10, 60, 40, 0, 30),
    "anchor-and-own-block": (70, 25, 32, 64, None),
    "band-from-lo-after-cache": (70, 25, 0, 40, None),
}


@pytest.mark.parametrize("kernels", ["torch", "cpp"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "cache-only"])
@pytest.mark.parametrize("case", PREFILL)
def test_prefill_over_key_ranges(monkeypatch, kernels, layout, fresh, case):
    monkeypatch.setenv("LONGSERVE_KERNELS", kernels)
    cached, t, sinks, lo, window = PREFILL[case]
    kc, vc, [(table, k, v)] = filled(layout, [cached + t])
    q = torch.randn(HQ, t, D)
    plan = prefill_plan(cached, t, sinks=sinks, lo=lo, window=window)
    new = (k[:, cached:], v[:, cached:]) if fresh else None
    got = paged_prefill(q, kc, vc, table, plan, SCALE, new)
    qpos, kpos = torch.arange(cached, cached + t)[:, None], torch.arange(cached + t)
    in_band = (kpos >= lo) & ((qpos - kpos < window) if window else True)
    want = masked_attention(q, k, v, (kpos <= qpos) & ((kpos < sinks) | in_band), SCALE)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernels", ["torch", "cpp"])
@pytest.mark.parametrize("layout", ["contiguous", "vllm-cpu"])
@pytest.mark.parametrize("case", [(300, 200, 256, 256, None), (100, 300, 20, 0, 64)], ids=["tca-front", "swaa"])
def test_prefill_with_a_keep_mask(monkeypatch, kernels, layout, case):
    """A keep mask hides, per KV head, the sink keys it does not hold: TCA's front before its frontier (at 256: the C++
    kernel's first two 128-key tiles, the second kept by no head), or SWAA's sinks under a window."""
    monkeypatch.setenv("LONGSERVE_KERNELS", kernels)
    cached, t, sinks, lo, window = case
    n = cached + t
    kc, vc, [(table, k, v)] = filled(layout, [n], d=64, bs=32)
    keep = torch.rand(NB, 32, HKV, generator=torch.Generator().manual_seed(2)) < 0.5
    keep[table[4:8]] = False
    q = torch.randn(HQ, t, 64)
    got = paged_prefill(q, kc, vc, table, prefill_plan(cached, t, sinks=sinks, lo=lo, window=window), 0.125,
                        keep=keep)
    qpos, kpos = torch.arange(cached, n)[:, None], torch.arange(n)
    kept = keep[table].flatten(0, 1)[:n].T[:, None, :]  # [H_kv, 1, n]
    in_band = (kpos >= lo) & ((qpos - kpos < window) if window else True)
    visible = (kpos <= qpos) & (((kpos < sinks) & kept) | in_band)  # [H_kv, t, n]
    want = masked_attention(q, k, v, visible.repeat_interleave(HQ // HKV, 0), 0.125)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


CPP_PREFILL = {  # name: (query heads, KV heads, head dim, dtype, (cached, chunk, sinks, lo, window))
    # The embedded model's geometry: 16 positions a group of rows, four groups a task, so this chunk is four tasks
    # a KV head, and its last task is a group and a bit, the bit's rows padded.
    "embedded-after-cache": (9, 3, 64, torch.float32, (150, 200, 0, 0, None)),
    "embedded-window-and-sinks": (9, 3, 64, torch.float32, (150, 200, 4, 0, 70)),
    "one-query-head-a-group": (4, 4, 20, torch.float32, (30, 170, 0, 0, None)),  # 48 positions; channels 8 + 8 + 4
    "seven-query-heads-a-group": (7, 1, 16, torch.float32, (0, 50, 0, 0, None)),  # 6 positions: 42 of 48 rows
    "anchor-and-band": (6, 2, 32, torch.float32, (100, 90, 32, 64, 40)),
    "bfloat16": (9, 3, 64, torch.bfloat16, (40, 100, 0, 0, None)),
    # More query heads a KV head than a group has rows: slices of 25 and 24 heads (AVX2: 17, 16, 16), one position
    # a group.
    "multi-query-49-heads": (49, 1, 16, torch.float32, (20, 60, 0, 0, None)),
    "two-kv-heads-of-60": (120, 2, 16, torch.float32, (0, 40, 2, 0, 25)),
}


@pytest.mark.parametrize("case", CPP_PREFILL)
def test_cpp_prefill_at_model_sizes(monkeypatch, case):
    """The C++ kernel's tiling (groups of 48 rows with AVX-512, 24 with AVX2, tasks of four groups, tiles of 128 keys
    from scattered blocks) against the explicit reference."""
    monkeypatch.setenv("LONGSERVE_KERNELS", "cpp")
    hq, hkv, d, dtype, (cached, t, sinks, lo, window) = CPP_PREFILL[case]
    n = cached + t
    g = torch.Generator().manual_seed(3)
    nb = n // BS + 4
    table = torch.randperm(nb - 1, generator=g)[: -(-n // BS)] + 1
    k, v = (torch.randn(hkv, n, d, generator=g).to(dtype) for _ in range(2))
    kc, vc = torch.zeros(nb, BS, hkv, d, dtype=dtype), torch.zeros(nb, BS, hkv, d, dtype=dtype)
    write_kv(kc, vc, k.transpose(0, 1), v.transpose(0, 1), context_slots(table, 0, n, BS))
    q = torch.randn(t, hq, d, generator=g).to(dtype).transpose(0, 1)  # the model's layout: a strided view
    got = paged_prefill(q, kc, vc, table, prefill_plan(cached, t, sinks=sinks, lo=lo, window=window, dtype=dtype),
                        d**-0.5)
    qpos, kpos = torch.arange(cached, n)[:, None], torch.arange(n)
    in_band = (kpos >= lo) & ((qpos - kpos < window) if window else True)
    want = masked_attention(q.float(), k.float(), v.float(), (kpos <= qpos) & ((kpos < sinks) | in_band), d**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's own rounding
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("layout", ["contiguous", "vllm-cpu"])
@pytest.mark.parametrize("visibility", [(0, -1), (4, 30)], ids=["causal", "sinks-and-window"])
def test_cpp_prefill_through_a_table_per_kv_head(layout, visibility):
    """A table `[H_kv, N]`: each KV head's query heads read their own blocks (here another sequence's)."""
    from attention_backends.kernels import cpu_ext

    sinks, window = visibility
    kc, vc, seqs = filled(layout, [120, 120, 120])
    heads, start, t = (1, 2), 70, 50  # KV head h reads sequence heads[h]
    tables = torch.stack([seqs[i][0] for i in heads]).to(torch.int32)
    q = torch.randn(HQ, t, D)
    got = torch.empty_like(q)
    cpu_ext.load().paged_prefill(got, q, kc, vc, tables, start, sinks, 0, window, SCALE)
    qpos, kpos = torch.arange(start, start + t)[:, None], torch.arange(start + t)
    in_band = (qpos - kpos < window) if window > 0 else True
    visible = (kpos <= qpos) & ((kpos < sinks) | in_band)
    g = HQ // HKV
    for h, i in enumerate(heads):
        _, k, v = seqs[i]
        want = masked_attention(q[h * g : (h + 1) * g], k[h : h + 1, : start + t], v[h : h + 1, : start + t], visible,
                                SCALE)
        torch.testing.assert_close(got[h * g : (h + 1) * g], want, atol=1e-5, rtol=1e-5)


def test_cpp_prefill_refuses_bad_tables_and_groups(monkeypatch):
    monkeypatch.setenv("LONGSERVE_KERNELS", "cpp")
    from attention_backends.kernels import cpu_ext

    prefill = cpu_ext.load().paged_prefill
    kc, vc, [(table, _, _)] = filled("contiguous", [40])
    q = torch.randn(HQ, 8, D)
    with pytest.raises(RuntimeError, match="shorter than the chunk's end"):
        prefill(torch.empty_like(q), q, kc, vc, table[:2].int(), 32, 0, 0, -1, SCALE)
    bad = table.int().clone()
    bad[1] = NB
    with pytest.raises(RuntimeError, match="block id out of range"):
        prefill(torch.empty_like(q), q, kc, vc, bad, 32, 0, 0, -1, SCALE)
    per_head = torch.stack([table.int(), bad])  # the second KV head's table reaches past the cache
    with pytest.raises(RuntimeError, match="block id out of range"):
        prefill(torch.empty_like(q), q, kc, vc, per_head, 32, 0, 0, -1, SCALE)
    with pytest.raises(RuntimeError, match="a table per KV head"):
        prefill(torch.empty_like(q), q, kc, vc, torch.stack([table.int()] * (HKV + 1)), 32, 0, 0, -1, SCALE)
    q = torch.randn(HKV + 1, 8, D)
    with pytest.raises(RuntimeError, match="must divide the query heads"):
        prefill(torch.empty_like(q), q, kc, vc, table.int(), 32, 0, 0, -1, SCALE)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("sets", [HKV, HQ], ids=["per-kv-head", "per-query-head"])
def test_slot_attention_reads_each_rows_own_slots(layout, sets):
    kc, vc, seqs = filled(layout, [90, 33])
    g = torch.Generator().manual_seed(1)
    rows = [(0, 89), (1, 20), (0, 50)]  # (sequence, position) of each query row
    m = 12
    q = torch.randn(HQ, len(rows), D, generator=g)
    picks = torch.stack([torch.stack([torch.randperm(pos + 1, generator=g)[:m] for _ in range(sets)])
                         for _, pos in rows], 1)  # [S, n, m] positions
    slots = torch.stack([context_slots(seqs[s][0], 0, pos + 1, BS)[picks[:, i]] for i, (s, pos) in enumerate(rows)], 1)
    visible = torch.rand(sets, len(rows), m, generator=g) < 0.8
    visible[..., 0] = True
    got = slot_attention(q, kc, vc, slots, visible, SCALE)
    for i, (s, pos) in enumerate(rows):
        k, v = seqs[s][1][:, : pos + 1], seqs[s][2][:, : pos + 1]
        mask = torch.zeros(HQ, 1, pos + 1, dtype=torch.bool)
        for h in range(HQ):
            j = h // (HQ // sets)
            mask[h, 0, picks[j, i][visible[j, i]]] = True
        torch.testing.assert_close(got[:, i : i + 1], masked_attention(q[:, i : i + 1], k, v, mask, SCALE),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_range_work_batches_chunks_and_decodes_of_any_visibility(layout):
    # (cached tokens, queries, sinks, window): chunks and one-query rows, exact and windowed, in one packed batch.
    rows = [(0, 40, 0, None), (60, 1, 0, None), (37, 29, 4, 16), (120, 1, 3, 20), (9, 1, 0, 5), (0, 1, 0, None)]
    kc, vc, seqs = filled(layout, [c + t for c, t, _, _ in rows])
    starts = torch.tensor([0] + [t for _, t, _, _ in rows]).cumsum(0).tolist()
    plan_rows = [RangeRow(r0, table, c, t, sinks, window)
                 for r0, (table, _, _), (c, t, sinks, window) in zip(starts, seqs, rows)]
    work = range_work(plan_rows, block_size=BS, group=HQ // HKV, dtype=torch.float32, device="cpu", num_blocks=NB)
    q = torch.randn(HQ, starts[-1], D)
    assert [q[0, r, 0].numel() for r, _ in work.decode] == [2, 2]  # full rows apart from windowed ones
    out = torch.full_like(q, float("nan"))
    attend_ranges(out, q, None, None, kc, vc, work, SCALE)
    for r0, (_, k, v), (c, t, sinks, window) in zip(starts, seqs, rows):
        qpos, kpos = torch.arange(c, c + t)[:, None], torch.arange(c + t)
        visible = (kpos <= qpos) & ((kpos < sinks) | ((qpos - kpos < window) if window else True))
        torch.testing.assert_close(out[:, r0 : r0 + t], masked_attention(q[:, r0 : r0 + t], k, v, visible, SCALE),
                                   atol=1e-5, rtol=1e-5)


class Rule:  # a request's keep rule, as ScorerParams gives it
    def __init__(self, sinks: int, local_window: int, k_frac: float, min_keep: int, dense_len: int) -> None:
        self.sinks, self.local_window, self.k_frac, self.min_keep, self.dense_len = (sinks, local_window, k_frac,
                                                                                     min_keep, dense_len)


def check_topk_decode(kernels: str, layout: str, per_kv_head: bool, hq: int, dim: int, rank: int) -> None:
    """Each row's output equals exact attention over the keys its rule keeps: the sinks, the local window and the
    budget's best by the sums of each key set's queries on the first `rank` channels."""
    lengths = [530, 90, 40, 60]  # 530: two pieces of work; 40: under its floor; 60: no scored keys kept
    rules = [Rule(8, 32, 0.25, 16, 64), Rule(0, 0, 0.1, 20, 64), Rule(4, 4, 0.5, 1, 64), Rule(2, 3, 0.0, 0, 0)]
    kc, vc, seqs = filled(layout, lengths, d=dim)
    # longserve keeps the low-rank keys in a table of their own, positions contiguous; vLLM's cache holds them as its
    # keys' first channels
    low = kc[..., :rank]
    if layout == "contiguous":
        low = low.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    q = torch.randn(len(lengths), hq, dim, generator=torch.Generator().manual_seed(3))
    plan = topk_decode_plan([t for t, _, _ in seqs], lengths, rules, num_blocks=NB)
    assert plan.kernel == kernels
    sets = HKV if per_kv_head else hq
    got = lowrank_topk_decode(q, low, kc, vc, plan, sets, dim**-0.5)
    heads = hq // sets
    for b, ((_, k, v), n, r) in enumerate(zip(seqs, lengths, rules)):
        kpos = torch.arange(n)
        forced = (kpos < r.sinks) | (kpos >= n - r.local_window)
        budget = n if n < r.dense_len else max(int(r.k_frac * n), r.min_keep)
        mask = torch.zeros(hq, 1, n, dtype=torch.bool)
        for s in range(sets):
            qs = q[b, s * heads : (s + 1) * heads, :rank].sum(0)
            approx = (k[s * heads // (hq // HKV), :, :rank] @ qs).masked_fill(forced, float("-inf"))
            best = approx.topk(min(budget, int((~forced).sum()))).indices
            mask[s * heads : (s + 1) * heads, 0, best] = True
            mask[s * heads : (s + 1) * heads, 0, forced] = True
        assert 0 < int(mask[0].sum()) <= n
        want = masked_attention(q[b][:, None], k, v, mask, dim**-0.5)[:, 0]
        torch.testing.assert_close(got[b], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernels", ["torch", "cpp"])
@pytest.mark.parametrize("layout", ["contiguous", "vllm-cpu"])
@pytest.mark.parametrize("per_kv_head", [True, False], ids=["per-kv-head", "per-query-head"])
def test_lowrank_topk_decode_keeps_each_sets_best_keys(monkeypatch, kernels, layout, per_kv_head):
    monkeypatch.setenv("LONGSERVE_KERNELS", kernels)
    check_topk_decode(kernels, layout, per_kv_head, HQ, D, 4)


@pytest.mark.parametrize("kernels", ["torch", "cpp"])
def test_lowrank_topk_decode_rotates_the_queries_and_writes_into_out(monkeypatch, kernels):
    # vLLM's Loki hands the op its queries unrotated with each KV head's basis, and the rows of its output to fill.
    monkeypatch.setenv("LONGSERVE_KERNELS", kernels)
    lengths = [530, 90]
    kc, vc, seqs = filled("vllm-cpu", lengths)
    g = torch.Generator().manual_seed(5)
    rotation = torch.linalg.qr(torch.randn(HKV, D, D, generator=g)).Q
    q = torch.randn(len(lengths), HQ, D, generator=g)
    plan = topk_decode_plan([t for t, _, _ in seqs], lengths, [Rule(8, 32, 0.25, 16, 64)] * 2, num_blocks=NB)
    rotated = torch.stack([q[:, c] @ rotation[c // (HQ // HKV)] for c in range(HQ)], 1)
    want = lowrank_topk_decode(rotated, kc[..., :4], kc, vc, plan, HKV, SCALE)
    out = torch.full_like(q, float("nan"))
    got = lowrank_topk_decode(q, kc[..., :4], kc, vc, plan, HKV, SCALE, query_rotation=rotation, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("hq", [2, 6, 10])
@pytest.mark.parametrize("per_kv_head", [True, False], ids=["per-kv-head", "per-query-head"])
def test_cpp_topk_decode_at_the_head_dims_it_compiles_for(monkeypatch, dim, hq, per_kv_head):
    # 64 and 128 take the kernel's fixed-width loops, and a rank of a quarter of them its fixed-rank scoring (the
    # other tests' head dim 16 takes the general ones); on longserve's layout in float32, 1 to 4 query heads per key
    # set take the exact pass's register-blocked loops, 5 the general ones.
    monkeypatch.setenv("LONGSERVE_KERNELS", "cpp")
    check_topk_decode("cpp", "contiguous", per_kv_head, hq, dim, dim // 4)


def test_cpp_topk_decode_keeps_the_earlier_of_equal_scores(monkeypatch):
    # Low-rank channels and queries of small integers give exact scores of a few values: the budget ends inside a
    # run of equal scores at every level of the selection, and the earliest keys of that run are the ones kept.
    monkeypatch.setenv("LONGSERVE_KERNELS", "cpp")
    n, rank, heads = 530, 4, HQ // HKV
    g = torch.Generator().manual_seed(7)
    kc, vc, [(table, k, v)] = filled("contiguous", [n], seed=7)
    k[..., :rank] = torch.randint(-1, 2, (HKV, n, rank), generator=g).float()
    write_kv(kc, vc, k.transpose(0, 1), v.transpose(0, 1), context_slots(table, 0, n, BS))
    q = torch.randint(-1, 2, (1, HQ, D), generator=g).float()
    rule = Rule(8, 32, 0.25, 16, 64)
    got = lowrank_topk_decode(q, kc[..., :rank], kc, vc, topk_decode_plan([table], [n], [rule], num_blocks=NB), HKV,
                              SCALE)
    budget, scored = int(rule.k_frac * n), torch.arange(rule.sinks, n - rule.local_window)
    mask = torch.zeros(HQ, 1, n, dtype=torch.bool)
    mask[..., : rule.sinks] = mask[..., n - rule.local_window :] = True
    for h in range(HKV):
        scores = k[h, scored, :rank] @ q[0, h * heads : (h + 1) * heads, :rank].sum(0)
        order = scored[torch.sort(-scores, stable=True).indices]  # score descending, position ascending
        assert scores[order[budget - 1] - rule.sinks] == scores[order[budget] - rule.sinks]  # a tie at the cut
        mask[h * heads : (h + 1) * heads, 0, order[:budget]] = True
    torch.testing.assert_close(got[0], masked_attention(q[0][:, None], k, v, mask, SCALE)[:, 0], atol=1e-5,
                               rtol=1e-5)


def test_cpp_topk_decode_refuses_a_row_that_keeps_nothing(monkeypatch):
    monkeypatch.setenv("LONGSERVE_KERNELS", "cpp")
    kc, vc, [(table, _, _)] = filled("contiguous", [40])
    plan = topk_decode_plan([table], [40], [Rule(0, 0, 0.0, 0, 0)], num_blocks=NB)  # no sinks, window or budget
    with pytest.raises(RuntimeError, match="keeps no key"):
        lowrank_topk_decode(torch.randn(1, HQ, D), kc[..., :4], kc, vc, plan, HKV, SCALE)


@pytest.mark.parametrize("flags, lanes", [("-mno-avx512f", 8), ("-mno-avx", 4)], ids=["avx2", "sse"])
def test_cpp_kernels_in_narrower_vectors(flags, lanes):
    """The C++ kernels built for narrower vectors than this machine's (AVX2's 8 floats and 16 registers, SSE's 4 and
    16, as on Arm's NEON but for its 32 registers: other register blocks and reduction trees) pass this file's C++
    tests and the model modules' kernel tests, built here with `flags` (`LONGSERVE_CPU_FLAGS`, a build of its own)."""
    from attention_backends.kernels import cpu_ext

    if cpu_ext.load().vector_lanes <= lanes:
        pytest.skip("this machine's own build has vectors this narrow, which the other tests check")
    root = Path(__file__).parent.parent
    script = ("import sys, pytest; from attention_backends.kernels import cpu_ext; "
              f"assert cpu_ext.load().vector_lanes == {lanes}, 'not the build asked for'; "
              "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/test_kernels.py', 'tests/test_models.py', "
              "'-k', '(cpp and not narrower) or cpu_linear or cpu_modules or silu_and_mul or rotary_kernel']))")
    env = {**os.environ, "LONGSERVE_CPU_FLAGS": flags}
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


@pytest.mark.skipif(not huge_pages_possible(), reason="this machine's kernel gives no transparent huge pages")
def test_a_cache_backed_by_huge_pages_reads_zeros_where_it_was_given_back():
    cache = torch.ones(3 << 20)  # 12 MiB: several whole huge pages and, at most, two ragged ends
    advised = back_with_huge_pages(cache)
    start = -cache.data_ptr() % HUGE_PAGE // cache.element_size()
    assert advised >= 4 * HUGE_PAGE and advised % HUGE_PAGE == 0 and huge_page_advised(cache)
    inside = slice(start, start + advised // cache.element_size())
    assert not cache[inside].any()  # given back: it reads as zeros, and faults in as huge pages once written
    assert cache[: inside.start].eq(1).all() and cache[inside.stop :].eq(1).all()  # the ragged ends keep theirs
    cache[inside] = 2.0
    assert cache[inside].eq(2).all()
    z = zeros((5, 1 << 19), torch.float16, torch.device("cpu"))
    assert z.dtype == torch.float16 and z.shape == (5, 1 << 19) and not z.any() and huge_page_advised(z)
