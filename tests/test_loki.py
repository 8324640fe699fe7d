"""Loki (`loki`): PCA calibration and its artifact, each layer against an explicit top-k masked reference,
reduction to dense, the `longserve calibrate` command, and serving."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from backend_harness import (
    ROOT,
    SynthSeq,
    assert_recipe_served,
    assert_same_as_dense,
    greedy_with_logprobs,
    masked_attention,
    run_steps,
    serve_default_recipes,
)
from conftest import natural_text
from safetensors.torch import load_file

from attention_backends import calibration
from attention_backends.context import AttentionSpec
from attention_backends.loki import LokiBackend, PCACalibrator
from attention_backends.registry import BackendError, validate_params
from kv_cache.paged_kv import KVSpec, PagedKVCache

BS, HQ, HKV, D, LAYERS = 16, 4, 2, 16, 2


pytestmark = pytest.mark.usefixtures("calibration_cache")


def test_pca_basis_is_orthonormal_and_keeps_attention_exact():
    torch.manual_seed(0)
    q, k, v = torch.randn(HQ, 300, D), torch.randn(HKV, 300, D) @ torch.randn(D, D), torch.randn(HKV, 300, D)
    cal = PCACalibrator()
    cal.observe(0, q, k)
    art = cal.result()
    w = art["components"][0]  # [H_kv, D, D]
    torch.testing.assert_close(w @ w.transpose(1, 2), torch.eye(D).expand(HKV, D, D), atol=1e-5, rtol=0)
    ratios = art["explained_variance_ratio"][0]
    assert torch.all(ratios[:, :-1] >= ratios[:, 1:]) and torch.allclose(ratios.sum(-1), torch.ones(HKV))
    causal = torch.ones(300, 300, dtype=torch.bool).tril()
    rotated = masked_attention(q @ w.repeat_interleave(2, 0).transpose(1, 2), k @ w.transpose(1, 2), v, causal,
                               D**-0.5)
    torch.testing.assert_close(rotated, masked_attention(q, k, v, causal, D**-0.5), atol=1e-5, rtol=1e-5)


def reference(q, qpos, k, v, w, p, scale):
    """Rows at positions qpos: scores on the first d rotated channels, each row's top-k of its context plus
    sinks and local tokens (per query head, or per KV group on the group's summed scores), exact attention."""
    n, g, d = int(qpos[-1]) + 1, HQ // HKV, p.rank(D)
    kr = k[:, :n] @ w.transpose(1, 2)
    qr = q @ w.repeat_interleave(g, 0).transpose(1, 2)
    mask = torch.zeros(HQ, len(qpos), n, dtype=torch.bool)
    for i, pos in enumerate(qpos.tolist()):
        for h in range(HKV):
            heads = range(h * g, (h + 1) * g)
            scores = torch.stack([qr[x, i, :d] @ kr[h, : pos + 1, :d].T for x in heads])
            sets = [scores.sum(0)] * g if p.selection == "group" else list(scores)
            for x, s in zip(heads, sets):
                forced = [j for j in range(pos + 1) if j < p.sinks or j > pos - p.local_window]
                s = s.clone()
                s[forced] = float("inf")
                budget = max(p.min_keep, int(p.k_frac * (pos + 1))) + len(forced)
                budget = pos + 1 if pos + 1 < p.dense_len else min(pos + 1, budget)
                mask[x, i, s.topk(budget).indices] = True
    return masked_attention(q, k[:, :n], v[:, :n], mask, scale)


SPARSE = dict(dense_len=0, min_keep=1, sinks=0, local_window=0)  # no floor: the pattern from the first token on
CASES = {
    "decode, per group": dict(SPARSE, k_frac=0.25, d_frac=0.25),
    "decode, per head, sinks and window": dict(SPARSE, k_frac=0.2, d_frac=0.5, selection="head", sinks=3,
                                               local_window=8),
    "topk prefill too": dict(SPARSE, k_frac=0.3, d_frac=0.25, prefill="topk", sinks=2, local_window=4),
    "floor and min_keep": dict(k_frac=0.1, d_frac=0.25, prefill="topk", dense_len=70, min_keep=16, sinks=0,
                               local_window=0),
}


@pytest.mark.parametrize("chunks", [[130], [50, 47, 33]], ids=["one-chunk", "chunked"])
@pytest.mark.parametrize("case", CASES)
def test_layers_match_masked_reference(case, chunks):
    torch.manual_seed(0)
    spec = AttentionSpec(LAYERS, HQ, HKV, D, 4096, BS, (None,) * LAYERS)
    kv = PagedKVCache(KVSpec(LAYERS, HKV, D, BS), num_blocks=40)
    backend = LokiBackend(kv, spec)
    params = validate_params("loki", CASES[case])
    basis = torch.linalg.qr(torch.randn(LAYERS, HKV, D, D))[0].transpose(-1, -2).contiguous()
    backend.load_calibration(params, {"components": basis})
    seqs = {"a": SynthSeq.random(LAYERS, HQ, HKV, D, sum(chunks) + 12, sum(chunks), 1, BS),
            "b": SynthSeq.random(LAYERS, HQ, HKV, D, 60 + 12 + len(chunks), 60, 20, BS)}
    schedule = [[("a", n), ("b", 60 if i == 0 else 1)] for i, n in enumerate(chunks + [1] * 12)]

    def check(layer, name, step, got):
        s = seqs[name]
        qpos = torch.arange(step.num_computed_tokens, step.context_len)
        q = s.q[layer][:, qpos]
        if step.phase.value == "prefill" and params.prefill == "dense":
            want = masked_attention(q, s.k[layer][:, : qpos[-1] + 1], s.v[layer][:, : qpos[-1] + 1],
                                    torch.arange(int(qpos[-1]) + 1)[None] <= qpos[:, None], D**-0.5)
        else:
            want = reference(q, qpos, s.k[layer], s.v[layer], basis[layer], params, D**-0.5)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    run_steps(backend, seqs, schedule, params, check)


def test_params_validation():
    for bad in (dict(k_frac=0), dict(d_frac=1.5), dict(selection="token"), dict(prefill="sparse"), dict(nope=1)):
        with pytest.raises(BackendError):
            validate_params("loki", bad)


def test_every_channel_and_every_token_reduces_to_dense(make_engine, loaded):
    """Calibrates on first use (the bundled text, into the empty cache), then must equal dense."""
    prompts = [loaded.tokenizer.encode(natural_text(n, 21 + n)) for n in (3, 30)]
    engine = make_engine(max_num_batched_tokens=256)
    dense = greedy_with_logprobs(engine, prompts)
    # Row-wise top-k prefill over every token gathers each row's whole context: the short prompt only.
    every = dict(k_frac=1.0, d_frac=1.0, dense_len=0)  # no floor: the top-k path itself
    for params, n in ((every, 2), (dict(every, prefill="topk"), 1)):
        assert_same_as_dense(dense[:n], greedy_with_logprobs(engine, prompts[:n], attention_backend="loki",
                                                             attention_params=params))
    path = calibration.artifact_path("loki", loaded.fingerprint, validate_params("loki", {}), BS)
    assert path.exists()


def test_artifact_round_trips_and_is_refused_for_another_model(make_engine, loaded, tmp_path):
    engine = make_engine()
    engine.prepare_backend("loki", validate_params("loki", {}))  # made on first use, or found in the cache
    path = calibration.artifact_path("loki", loaded.fingerprint, validate_params("loki", {}), BS)
    tensors = load_file(path)
    assert tensors["components"].shape == (30, 3, 64, 64) and tensors["mean"].shape == (30, 3, 64)
    params = validate_params("loki", {})
    again = calibration.load_artifact(path, "loki", loaded.fingerprint, params, None, BS)
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)
    other = tmp_path / "other-model.safetensors"
    calibration.save_artifact(other, tensors, "loki", "0123456789abcdef", params, "text", 10)
    with pytest.raises(BackendError, match=r"model_fingerprint '0123456789abcdef'.*longserve calibrate --backend "
                                           rf"loki --output {other}"):
        engine.add_request("hello", attention_backend="loki", attention_params={"calibration": str(other)})
    with pytest.raises(BackendError, match="does not exist"):
        engine.add_request("hello", attention_backend="loki", attention_params={"calibration": "/nonexistent.st"})


def test_calibrate_command_writes_the_artifact(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text(natural_text(60, 4))
    out = tmp_path / "loki.safetensors"
    proc = subprocess.run([sys.executable, "-m", "server.cli", "calibrate", "--backend", "loki", "--data", str(data),
                           "--max-tokens", "300", "--output", str(out)], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "calibrating loki on 300 tokens" in proc.stderr and "30/30" in proc.stderr  # the progress bar
    tensors = load_file(out)
    assert tensors["components"].shape == (30, 3, 64, 64)
    assert str(out) in proc.stdout


def test_served_by_name_and_by_extra_body(start_server):
    server, client, recipes = serve_default_recipes(start_server)
    assert_recipe_served(server, client, recipes, "smollm2-135m:loki", natural_text(60, 8))
