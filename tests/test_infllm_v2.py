"""InfLLM-V2 (`infllm_v2`): each layer against an explicit reference that builds every query group's
selected-block mask from the raw keys, reduction to dense, side tables freed with their blocks, serving."""

from __future__ import annotations

import openai
import pytest
import torch
from backend_harness import (
    SynthSeq,
    assert_recipe_served,
    assert_same_as_dense,
    greedy_with_logprobs,
    masked_attention,
    run_steps,
    serve_default_recipes,
)
from conftest import natural_text

from attention_backends.context import AttentionSpec
from attention_backends.infllm_v2 import MEANS_TABLE, InfLLMV2Backend
from attention_backends.kernels import block_sparse
from attention_backends.kernels.block_sparse import (
    Selection,
    SparseRow,
    attend_block_sparse,
    compress,
    decode_pages,
    sparse_plan,
    sparse_prefill,
)
from attention_backends.kernels.paged import take_blocks
from attention_backends.registry import BackendError, validate_params
from engine.sampling_params import SamplingParams
from kv_cache.paged_kv import KVSpec, PagedKVCache

BS, HQ, HKV, D, LAYERS = 16, 4, 2, 16, 2
SMALL = dict(block_size=32, kernel_size=32, kernel_stride=16, topk=3, init_blocks=1, local_blocks=1)


def reference(q, qpos, k, v, prompt_len, p, scale):
    """q `[Hq, T, D]` at positions qpos (one step's rows of one sequence) over keys 0..qpos[-1], spelled out:
    tier-1/2 means straight from the keys, per-row visibility, group sums, overlap max, forced blocks, top-k."""
    n, b, ks, ss = int(qpos[-1]) + 1, p.block_size, p.kernel_size, p.kernel_stride
    kpos = torch.arange(n)
    k_sel = p.topk + p.local_blocks
    sparse = (qpos >= k_sel * b) & ((p.dense_len < 0) | (prompt_len >= p.dense_len) | (qpos + 1 >= p.dense_len))
    mask = (kpos[None] <= qpos[:, None]).expand(HQ, -1, -1).clone()
    if not sparse.any():
        return masked_attention(q, k[:, :n], v[:, :n], mask, scale)

    def entries(kernel, stride):
        starts = range(0, n - kernel + 1, stride)
        return (torch.stack([k[:, s : s + kernel].mean(1) for s in starts], 1),
                torch.tensor([s + kernel - 1 for s in starts]))

    c1, last1 = entries(ks, ss)
    c2, last2 = entries(4 * ks, 4 * ss)
    for cur in sorted({int(x) // b for x in qpos[sparse]}):
        rows = [i for i in range(len(qpos)) if sparse[i] and int(qpos[i]) // b == cur]
        score = torch.zeros(HKV, len(last1))
        for i in rows:
            for h in range(HQ):
                g = h // (HQ // HKV)
                s1 = (q[h, i] @ c1[g].T) * scale
                s2 = (q[h, i] @ c2[g].T) * scale
                vis1, vis2 = last1 <= qpos[i], last2 <= qpos[i]
                lse = torch.logsumexp(s2[vis2], 0) if vis2.any() else torch.logsumexp(s1[vis1], 0)
                score[g] += torch.where(vis1, torch.exp(s1 - lse), torch.zeros(()))
        for g in range(HKV):
            block = torch.zeros(cur + 1)
            for j in range(cur + 1):
                overlap = [i for i in range(len(last1)) if i * ss < (j + 1) * b and i * ss + ks > j * b]
                block[j] = score[g, overlap].max() if overlap else 0.0
                if j < p.init_blocks or j >= cur - p.local_blocks:
                    block[j] = float("inf")
            chosen = torch.zeros(n, dtype=torch.bool)
            for j in block.sort(descending=True, stable=True).indices[:k_sel].tolist():  # ties: earlier block
                chosen[j * b : (j + 1) * b] = True
            for h in range(g * (HQ // HKV), (g + 1) * (HQ // HKV)):
                mask[h, rows] &= chosen
    return masked_attention(q, k[:, :n], v[:, :n], mask, scale)


def _backend(num_blocks=80):
    spec = AttentionSpec(LAYERS, HQ, HKV, D, 4096, BS, (None,) * LAYERS)
    kv = PagedKVCache(KVSpec(LAYERS, HKV, D, BS), num_blocks=num_blocks)
    return InfLLMV2Backend(kv, spec), kv


CASES = {  # name: (dense_len, prompt chunks of A, decodes)
    "always-sparse": (-1, [300], 40),
    "always-sparse-chunked": (-1, [100, 77, 123], 40),
    "long-prompt-chunked": (200, [150, 61, 89], 10),
    "crosses-while-decoding": (310, [100, 200], 40),
}


@pytest.mark.parametrize("kernels", ["torch", "cpp"])  # decodes: slot lists and SDPA, or the C++ paged decode
@pytest.mark.parametrize("tile", ["one-tile", "tile-per-group"])
@pytest.mark.parametrize("case", CASES)
def test_layers_match_masked_reference(case, tile, kernels, monkeypatch):
    monkeypatch.setenv("LONGSERVE_KERNELS", kernels)
    if tile == "tile-per-group":
        monkeypatch.setattr(block_sparse, "TILE_ELEMS", 1)
    dense_len, chunks, decodes = CASES[case]
    torch.manual_seed(0)
    backend, kv = _backend()
    params = validate_params("infllm_v2", dict(SMALL, dense_len=dense_len))
    prompt = sum(chunks)
    # A runs its chunks then decodes across several block boundaries; B (other blocks) prefills then decodes.
    seqs = {"a": SynthSeq.random(LAYERS, HQ, HKV, D, prompt + decodes, prompt, 1, BS),
            "b": SynthSeq.random(LAYERS, HQ, HKV, D, 260 + len(chunks) + decodes, 260, 40, BS)}
    schedule = [[("a", n), ("b", 260 if i == 0 else 1)] for i, n in enumerate(chunks + [1] * decodes)]

    def check(layer, name, step, got):
        s = seqs[name]
        qpos = torch.arange(step.num_computed_tokens, step.context_len)
        want = reference(s.q[layer][:, qpos], qpos, s.k[layer], s.v[layer], s.prompt_len, params, D**-0.5)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    run_steps(backend, seqs, schedule, params, check)
    assert backend.means.filled[seqs["a"].table[: (prompt + decodes) // BS]].all()


def test_sparse_kernel_over_every_block_is_dense():
    """Queries in block k-1 see k blocks: the selection takes all of them and the kernel must be exact."""
    torch.manual_seed(1)
    backend, kv = _backend()
    params = validate_params("infllm_v2", dict(SMALL, dense_len=-1))
    sel = params.selection(BS)
    n = sel.k * sel.block
    seq = SynthSeq.random(LAYERS, HQ, HKV, D, n, n, 1, BS)
    run_steps(backend, {"s": seq}, [[("s", n)]], params, lambda *a: None)
    start = n - sel.block + 5
    c = compress(take_blocks(backend.means.data[0], seq.table[: n // BS]), sel)
    got = sparse_prefill(kv.k[0], kv.v[0], seq.q[0][:, start:], start, seq.table, c, sel, D**-0.5)
    qpos = torch.arange(start, n)
    want = masked_attention(seq.q[0][:, start:], seq.k[0], seq.v[0], torch.arange(n)[None] <= qpos[:, None], D**-0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


GEOMETRIES = {  # Selection(page, block, kernel, stride, init_blocks, local_blocks, k)
    "kernel-spans-two-strides": Selection(16, 32, 32, 16, 1, 1, 4),
    "the-defaults-shape": Selection(16, 64, 32, 16, 1, 2, 6),
    "one-page-blocks-no-forced": Selection(16, 16, 16, 16, 0, 0, 3),
    "kernel-past-the-block": Selection(8, 32, 64, 16, 2, 1, 5),
    "no-tier-1-key-yet": Selection(16, 16, 64, 16, 0, 0, 2),
}


@pytest.mark.parametrize("heads", [(4, 2), (3, 1), (2, 2)], ids=["gqa", "mqa", "mha"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_cpp_selection_matches_the_reference_ops(geometry, heads, monkeypatch):
    """Decode rows at many positions (before any tier-1 or tier-2 key exists, across blocks), block tables that are
    scattered, shared or end at the row's last page: the C++ selection picks the reference ops' pages exactly,
    structural ties included."""
    sel, (hq, hkv) = GEOMETRIES[geometry], heads
    torch.manual_seed(hq + len(geometry))
    num_blocks = 200
    means = torch.randn(num_blocks, hkv, D)
    first = (sel.k - 1) * sel.block
    positions = sorted({first, first + 1, first + sel.block - 1, *torch.randint(first, 700, (9,)).tolist()})
    rows = []
    for i, pos in enumerate(positions):
        pages = pos // sel.page + 1
        table = torch.randperm(num_blocks)[: pages + i % 3]  # some rows' tables end at their last page
        if i % 4 == 1:  # a prefix shared with the row before
            shared = len(rows[-1].block_table) // 2
            table[:shared] = rows[-1].block_table[:shared]
        rows.append(SparseRow(i, table, pos, 1))
    q = torch.randn(len(rows), hq, D) * 3
    want = {}
    for kernels in ("torch", "cpp"):
        monkeypatch.setenv("LONGSERVE_KERNELS", kernels)
        want[kernels] = decode_pages(q, means, sparse_plan(rows, sel), sel, D**-0.5)
    assert want["cpp"].shape == (len(rows), hkv, sel.k * sel.pages_per_block)
    assert torch.equal(want["cpp"].long(), want["torch"].long())


def test_cpp_selection_refuses_rows_it_cannot_serve(monkeypatch):
    monkeypatch.setenv("LONGSERVE_KERNELS", "cpp")
    sel, means, q = GEOMETRIES["the-defaults-shape"], torch.randn(50, HKV, D), torch.randn(1, HQ, D)
    with pytest.raises(RuntimeError, match="fewer than k"):
        decode_pages(q, means, sparse_plan([SparseRow(0, torch.arange(50), sel.block * (sel.k - 1) - 1, 1)], sel),
                     sel, 1.0)
    with pytest.raises(RuntimeError, match="block id out of range"):
        decode_pages(q, means, sparse_plan([SparseRow(0, torch.arange(50) + 10, 700, 1)], sel), sel, 1.0)


@pytest.mark.parametrize("kernels", ["torch", "cpp"])
def test_decodes_in_any_rows_of_a_step(kernels, monkeypatch):
    """Decodes at rows 0 and 2 of a step (gathered) give what each gives alone (a view), and row 1 is left alone."""
    monkeypatch.setenv("LONGSERVE_KERNELS", kernels)
    torch.manual_seed(2)
    sel, kv = GEOMETRIES["kernel-spans-two-strides"], _backend()[1]
    kv.k[0].normal_()
    kv.v[0].normal_()
    means = torch.randn(kv.k[0].shape[0], HKV, D)
    rows = [SparseRow(0, torch.randperm(80)[:20], 300, 1), SparseRow(2, torch.randperm(80)[:20], 250, 1)]
    q = torch.randn(HQ, 3, D)
    out = torch.zeros_like(q)
    plan = sparse_plan(rows, sel)
    assert isinstance(plan.at, torch.Tensor)
    attend_block_sparse(out, q, kv.k[0], kv.v[0], means, plan, sel, D**-0.5)
    for r in rows:
        alone = torch.empty(HQ, 1, D)
        one = sparse_plan([SparseRow(0, r.block_table, r.start, 1)], sel)
        assert isinstance(one.at, slice)
        attend_block_sparse(alone, q[:, r.row : r.row + 1], kv.k[0], kv.v[0], means, one, sel, D**-0.5)
        torch.testing.assert_close(out[:, r.row], alone[:, 0], atol=0, rtol=0)
    assert not out[:, 1].any()


def test_params_validation(loaded):
    for bad in (dict(kernel_size=40), dict(block_size=40), dict(topk=1), dict(dense_len=-2), dict(nope=1)):
        with pytest.raises(BackendError):
            validate_params("infllm_v2", bad)
    backend, _ = _backend()
    with pytest.raises(ValueError, match="multiples of the KV cache block"):
        backend.check(validate_params("infllm_v2", dict(kernel_size=24, kernel_stride=8, block_size=48)))


@pytest.fixture(scope="module")
def prompts(loaded):
    return [loaded.tokenizer.encode(natural_text(n, 11 + n)) for n in (4, 30, 45)]


@pytest.mark.parametrize("params", [dict(dense_len=4096), dict(dense_len=-1, topk=16, local_blocks=1)],
                         ids=["below-dense_len", "topk-covers-every-block"])
def test_reduces_to_dense(make_engine, prompts, params):
    """The second case runs the sparse kernels, with every block selected, on the rows in block 16."""
    if params["dense_len"] < 0:
        assert 16 * 64 < max(len(p) for p in prompts) < max(len(p) for p in prompts) + 12 <= 17 * 64
    engine = make_engine(max_num_batched_tokens=256)
    assert_same_as_dense(greedy_with_logprobs(engine, prompts),
                         greedy_with_logprobs(engine, prompts, attention_backend="infllm_v2", attention_params=params))


def test_side_tables_freed_with_their_blocks(make_engine, prompts):
    engine = make_engine(enable_prefix_caching=False, max_num_batched_tokens=256)
    params = dict(dense_len=512, block_size=32, topk=4, local_blocks=2)
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ids = [engine.add_request(p, sp, attention_backend="infllm_v2", attention_params=params) for p in prompts]
    means = engine.kv.side_tables[MEANS_TABLE]
    peak = 0
    while engine.has_unfinished_requests():
        engine.step()
        peak = max(peak, int(means.filled.sum()))
    assert peak >= sum(len(p) for p in prompts[1:]) // 16  # the long prompts were summarised page by page
    assert engine.usage().used == 0 and not means.filled.any()
    assert ids


def test_served_by_name_and_by_extra_body(start_server):
    server, client, recipes = serve_default_recipes(start_server)
    assert_recipe_served(server, client, recipes, "smollm2-135m:infllm-v2", natural_text(120, 5))
    with pytest.raises(openai.BadRequestError, match="kernel_stride"):
        client.completions.create(model="smollm2-135m", prompt="x", max_tokens=1, extra_body={
            "attention_backend": "infllm_v2", "attention_params": {"kernel_size": 40}})
