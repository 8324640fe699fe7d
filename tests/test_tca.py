"""TCA-Attention (`tca`): calibration, each layer against an explicit reference (keep decisions recomputed
from the raw q/k, frontier, full mask), per-head budgets, reduction to dense, eviction, and serving."""

from __future__ import annotations

import math

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

from attention_backends import calibration
from attention_backends.context import AttentionSpec
from attention_backends.registry import BackendError, validate_params
from attention_backends.tca import KEEP_TABLE, TCABackend
from attention_backends.tca_calibration import TCACalibrator, candidates
from engine.sampling_params import SamplingParams
from kv_cache.paged_kv import KVSpec, PagedKVCache

BS, HQ, HKV, D, LAYERS = 16, 4, 2, 16, 2
THRESHOLDS = torch.tensor([0.5, 0.35, 0.25, 0.15])  # redundancy above 0.5: keep 1 token; below 0.15: all 16


pytestmark = pytest.mark.usefixtures("calibration_cache")


def keep_reference(q, k, n):
    """Per KV head, the tokens of each complete block among the first n that its last query keeps."""
    g, keep = HQ // HKV, torch.zeros(HKV, n, dtype=torch.bool)
    for j in range(n // BS):
        for h in range(HKV):
            a = torch.stack([((q[x, (j + 1) * BS - 1] @ k[h, j * BS : (j + 1) * BS].T) * D**-0.5).softmax(-1)
                             for x in range(h * g, (h + 1) * g)]).mean(0)
            red = 1 + (a * a.log()).sum() / math.log(BS)
            budget = 2 ** int((red < THRESHOLDS).sum())
            keep[h, j * BS + a.argsort(descending=True)[:budget]] = True
    return keep


@pytest.mark.parametrize(("local", "floor"), [(1, 0), (3, 0), (1, 100)], ids=["local-1", "local-3", "floor-100"])
@pytest.mark.parametrize("chunks", [[150], [40, 61, 49]], ids=["one-chunk", "chunked"])
def test_layers_match_masked_reference(chunks, local, floor):
    torch.manual_seed(0)
    spec = AttentionSpec(LAYERS, HQ, HKV, D, 4096, BS, (None,) * LAYERS)
    kv = PagedKVCache(KVSpec(LAYERS, HKV, D, BS), num_blocks=40)
    backend = TCABackend(kv, spec)
    params = validate_params("tca", dict(local_blocks=local, dense_len=floor))
    backend.load_calibration(params, {"thresholds": THRESHOLDS.expand(LAYERS, HKV, 4).clone()})
    decodes = 40
    seqs = {"a": SynthSeq.random(LAYERS, HQ, HKV, D, sum(chunks) + decodes, sum(chunks), 1, BS),
            "b": SynthSeq.random(LAYERS, HQ, HKV, D, 30 + decodes + len(chunks), 30, 20, BS)}
    for s in seqs.values():  # peaked attention in some blocks, flat in others: every budget occurs
        s.k *= torch.rand(LAYERS, HKV, s.k.shape[2], 1) * 4
    schedule = [[("a", n), ("b", 30 if i == 0 else 1)] for i, n in enumerate(chunks + [1] * decodes)]
    keeps = {name: [keep_reference(s.q[i], s.k[i], s.k.shape[2]) for i in range(LAYERS)] for name, s in seqs.items()}
    budgets_seen = set()

    def check(layer, name, step, got):
        s, c = seqs[name], step.num_computed_tokens
        frontier = max(0, ((c - 1) // BS - local + 1) * BS) if c and c >= floor else 0  # no eviction under it
        qpos = torch.arange(c, step.context_len)
        n = int(qpos[-1]) + 1
        kpos = torch.arange(n)
        kept = keeps[name][layer][:, :n].repeat_interleave(HQ // HKV, 0)
        mask = (kpos < frontier) & kept[:, None, :] | ((kpos >= frontier) & (kpos <= qpos[:, None]))
        want = masked_attention(s.q[layer][:, qpos], s.k[layer][:, :n], s.v[layer][:, :n], mask, D**-0.5)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    def release(name, step):
        for j in range((step.num_computed_tokens + 1 + BS - 1) // BS - 1, step.end // BS):
            if j >= 0 and (j + 1) * BS - 1 >= step.num_computed_tokens:  # completed in this step
                for layer in range(LAYERS):
                    got = backend.keep.data[layer, seqs[name].table[j]].sum(0)  # per KV head
                    want = keeps[name][layer][:, j * BS : (j + 1) * BS].sum(1)
                    assert torch.equal(got, want)
                    budgets_seen.update(got.tolist())
        for i in backend.blocks_to_release(step):  # poison what was given back: a later read turns into NaN
            kv.k[0][seqs[name].table[i]] = float("nan")
            kv.v[0][seqs[name].table[i]] = float("nan")

    run_steps(backend, seqs, schedule, params, check, release)
    assert budgets_seen >= {1, 16} and len(budgets_seen) >= 3
    region = len(seqs["a"].state.region)
    assert region < seqs["a"].state.frontier // BS  # compaction gave blocks back


def test_calibration_picks_the_sparsest_candidate_within_tolerance():
    torch.manual_seed(0)
    q, k = torch.randn(HQ, 640, D), torch.randn(HKV, 640, D) * torch.rand(1, 640, 1) * 3
    loose, tight = TCACalibrator(BS, 2, 0.5), TCACalibrator(BS, 2, 1e-6)
    for cal in (loose, tight):
        cal.observe(0, q, k)
    lo, hi = loose.result(), tight.result()
    assert torch.all(lo["lost_mass"] <= 0.5) and torch.all(hi["lost_mass"] <= 1e-6)
    assert torch.all(lo["keep_ratio"] < hi["keep_ratio"])
    assert lo["thresholds"].shape == (1, HKV, 4) and torch.all(lo["thresholds"].diff(dim=-1) <= 0)
    cands = candidates(BS)
    assert torch.allclose(cands.sum(1), torch.ones(len(cands), dtype=cands.dtype)) and cands[0, -1] == 1


def test_params_validation():
    for bad in (dict(tolerance=0), dict(tolerance=1), dict(local_blocks=0), dict(nope=1)):
        with pytest.raises(BackendError):
            validate_params("tca", bad)


def test_every_budget_all_tokens_reduces_to_dense(make_engine, loaded, tmp_path):
    params = validate_params("tca", dict(local_blocks=1, dense_len=0))  # compacts from the first block on
    path = tmp_path / "keep-all.safetensors"
    calibration.save_artifact(path, {"thresholds": torch.full((30, 3, 4), float("inf"))}, "tca", loaded.fingerprint,
                              params, "", 0)
    prompts = [loaded.tokenizer.encode(natural_text(n, 31 + n)) for n in (3, 30)]
    engine = make_engine(max_num_batched_tokens=256)
    assert_same_as_dense(greedy_with_logprobs(engine, prompts), greedy_with_logprobs(
        engine, prompts, attention_backend="tca",
        attention_params=dict(local_blocks=1, dense_len=0, calibration=str(path))))


def test_evicts_kv_and_the_pool_ends_all_free(make_engine, loaded, tmp_path):
    """Calibrated on first use; the blocks a request holds fall below dense's, and all come back."""
    engine = make_engine(max_num_batched_tokens=512)
    prompt = loaded.tokenizer.encode(natural_text(40, 5))
    params = dict(tolerance=0.1, local_blocks=2, dense_len=0)
    rid = engine.add_request(prompt, SamplingParams(max_tokens=40, ignore_eos=True, temperature=0),
                             attention_backend="tca", attention_params=params)
    held = []
    while engine.has_unfinished_requests():
        engine.step()
        if engine.has_unfinished_requests():
            held.append(engine.kv_manager.num_held_blocks(rid))
    dense_blocks = math.ceil((len(prompt) + 40) / BS)
    assert held[-1] < 0.8 * dense_blocks, (held[-1], dense_blocks)
    assert engine.usage().used == 0 and engine.usage().cached == 0  # no prefix caching for compacted blocks
    # Kept per block size: vLLM's 32-token pages need budgets of their own.
    path = calibration.artifact_path("tca", loaded.fingerprint, validate_params("tca", params), BS)
    assert path.exists() and path.name.endswith(f"-block{BS}.safetensors")
    assert KEEP_TABLE in engine.kv.side_tables


def test_artifact_for_other_params_is_refused(make_engine, loaded, tmp_path):
    made_for = validate_params("tca", dict(tolerance=0.2))
    path = tmp_path / "tca.safetensors"
    calibration.save_artifact(path, {"thresholds": torch.zeros(30, 3, 4)}, "tca", loaded.fingerprint, made_for, "", 0)
    with pytest.raises(BackendError, match=r"params \{'tolerance': 0.2, 'local_blocks': 4\} \(this server needs "
                                           r"\{'tolerance': 0.1.*longserve calibrate --backend tca --block-size 16 "
                                           r"--attention-params"):
        make_engine().add_request("hi", attention_backend="tca",
                                  attention_params=dict(tolerance=0.1, calibration=str(path)))


def test_served_by_name_and_by_extra_body(start_server):
    server, client, recipes = serve_default_recipes(start_server)
    assert_recipe_served(server, client, recipes, "smollm2-135m:tca", natural_text(60, 9))
