"""The scorer seam (`ScorerBackend`): a key-norm backend of a dozen lines (tests/knorm_backend.py) reduces to dense
when it keeps every token, and otherwise attends to exactly the tokens an explicit reference keeps."""

from __future__ import annotations

import pytest
import torch
from backend_harness import SynthSeq, assert_same_as_dense, greedy_with_logprobs, masked_attention, run_steps
from conftest import natural_text
from knorm_backend import KnormBackend

import attention_backends.registry as registry
from attention_backends.context import AttentionSpec
from kv_cache.paged_kv import KVSpec, PagedKVCache

BS, HQ, HKV, D, LAYERS = 16, 4, 2, 16, 2


@pytest.fixture
def knorm(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register_backend(KnormBackend)


def test_keeping_every_token_is_dense(knorm, make_engine, loaded):
    prompts = [loaded.tokenizer.encode(natural_text(n, 41 + n)) for n in (3, 30)]
    engine = make_engine(max_num_batched_tokens=256)
    assert_same_as_dense(greedy_with_logprobs(engine, prompts), greedy_with_logprobs(
        engine, prompts, attention_backend="knorm", attention_params={"k_frac": 1.0}))


@pytest.mark.parametrize("params", [dict(k_frac=0.3, dense_len=0, min_keep=1),
                                    dict(k_frac=0.2, sinks=3, local_window=5, dense_len=0, min_keep=1),
                                    dict(k_frac=0.25, prefill="topk", sinks=2, dense_len=50, min_keep=8)])
def test_layers_keep_the_smallest_norm_keys(knorm, params):
    torch.manual_seed(0)
    spec = AttentionSpec(LAYERS, HQ, HKV, D, 4096, BS, (None,) * LAYERS)
    backend = KnormBackend(PagedKVCache(KVSpec(LAYERS, HKV, D, BS), num_blocks=30), spec)
    p = registry.validate_params("knorm", params)
    seqs = {"a": SynthSeq.random(LAYERS, HQ, HKV, D, 110, 100, 1, BS),
            "b": SynthSeq.random(LAYERS, HQ, HKV, D, 57, 45, 10, BS)}
    schedule = [[("a", 60), ("b", 45)], [("a", 40), ("b", 1)]] + [[("a", 1), ("b", 1)]] * 10

    def check(layer, name, step, got):
        s, qpos = seqs[name], torch.arange(step.num_computed_tokens, step.context_len)
        n = int(qpos[-1]) + 1
        mask = torch.zeros(HQ, len(qpos), n, dtype=torch.bool)
        norms = s.k[layer][:, :n].norm(dim=-1)
        for i, pos in enumerate(qpos.tolist()):
            if step.phase.value == "prefill" and p.prefill == "dense":
                mask[:, i, : pos + 1] = True
                continue
            for h in range(HKV):
                score = -norms[h, : pos + 1].clone()
                forced = [j for j in range(pos + 1) if j < p.sinks or j > pos - p.local_window]
                score[forced] = float("inf")
                budget = max(p.min_keep, int(p.k_frac * (pos + 1))) + len(forced)
                keep = score.topk(pos + 1 if pos + 1 < p.dense_len else min(pos + 1, budget)).indices
                mask[h * (HQ // HKV) : (h + 1) * (HQ // HKV), i, keep] = True
        want = masked_attention(s.q[layer][:, qpos], s.k[layer][:, :n], s.v[layer][:, :n], mask, D**-0.5)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    run_steps(backend, seqs, schedule, p, check)
