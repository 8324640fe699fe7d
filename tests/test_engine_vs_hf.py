"""The engine against stock transformers on the embedded model: greedy tokens and packed-step logits."""

from __future__ import annotations

import pytest
import torch

from engine.sampling_params import SamplingParams
from tests.conftest import natural_text

NEW_TOKENS = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(loaded) -> list[list[int]]:
    """Five prompts from ~10 to ~2,000 tokens."""
    tok = loaded.tokenizer
    out = [tok.encode("The quick brown fox jumps over the")]
    for n, seed in [(4, 1), (18, 2), (44, 3), (87, 4)]:
        out.append(tok.encode(natural_text(n, seed) + " To sum up, the keeper"))
    lens = [len(p) for p in out]
    assert lens[0] <= 12 and 1800 <= lens[-1] <= 2200, lens
    return out


@pytest.fixture(scope="module")
def expected(prompts, hf_reference) -> list[list[int]]:
    with torch.inference_mode():
        return [
            hf_reference.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                  min_new_tokens=NEW_TOKENS)[0, len(p):].tolist()
            for p in prompts
        ]


def _assert_all_free(engine) -> None:
    usage = engine.usage()
    assert usage.used == 0 and usage.free == usage.num_blocks


def test_one_at_a_time(make_engine, prompts, expected):
    engine = make_engine()
    for p, exp in zip(prompts, expected):
        assert engine.generate([p], GREEDY)[0].token_ids == exp
        _assert_all_free(engine)


def test_continuous_batch(make_engine, prompts, expected):
    engine = make_engine()
    assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == expected
    _assert_all_free(engine)


def test_chunked_prefill(make_engine, prompts, expected):
    engine = make_engine(max_num_batched_tokens=256)
    step_tokens = []
    schedule = engine.scheduler.schedule

    def spy():
        out = schedule()
        step_tokens.append(out.num_tokens)
        return out

    engine.scheduler.schedule = spy
    assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == expected
    assert max(step_tokens) <= 256 and len(step_tokens) > sum(map(len, prompts)) // 256
    _assert_all_free(engine)


def test_preemption(make_engine, prompts, expected):
    # Longest prompt first; the pool admits it and the two shortest with one block to spare, so the
    # decodes soon run out of blocks and the newest request is preempted and recomputed.
    order = [4, 0, 1, 2, 3]
    blocks = sum(-(-len(prompts[i]) // 16) for i in order[:3]) + 2
    engine = make_engine(num_kv_blocks=blocks, max_model_len=len(prompts[4]) + NEW_TOKENS)
    outs = engine.generate([prompts[i] for i in order], GREEDY)
    assert [o.token_ids for o in outs] == [expected[i] for i in order]
    assert engine.scheduler.num_preemptions > 0
    _assert_all_free(engine)


def test_prefix_cache_second_pass(make_engine, prompts, expected):
    engine = make_engine()
    first = engine.generate(prompts, GREEDY)
    hits_before = engine.usage().prefix_hits
    second = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in first] == [o.token_ids for o in second] == expected
    for p, out in zip(prompts, second):
        assert out.num_cached_tokens == (len(p) - 1) // 16 * 16
    usage = engine.usage()
    assert usage.prefix_hits - hits_before == sum((len(p) - 1) // 16 * 16 for p in prompts)
    assert usage.cached > 0
    _assert_all_free(engine)


def test_packed_mixed_step_logits(make_engine, prompts, hf_reference):
    """One step holding a decode, a first prefill chunk, and a later chunk over cached KV."""
    engine = make_engine(max_num_batched_tokens=64, long_prefill_token_threshold=40)
    a, b, c = prompts[1][:30], prompts[2][:70], prompts[3][:50]
    sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for p in (a, b):
        engine.add_request(p, sp)
    engine.step()  # a: all 30 tokens (samples); b: first chunk
    engine.add_request(c, sp)
    sched = engine.scheduler.schedule()
    phases = [(seq.request_id, n, seq.num_computed_tokens) for seq, n in sched.scheduled]
    tables = {seq.request_id: engine.kv_manager.block_table(seq.request_id) for seq, _ in sched.scheduled}
    result = engine.runner.run(sched.scheduled, tables)
    assert phases[0][1] == 1 and phases[1][2] > 0 and phases[2][2] == 0, phases  # decode, later chunk, first chunk
    rows = [(seq, n) for seq, n in sched.scheduled if seq.num_computed_tokens + n == seq.num_tokens]
    with torch.inference_mode():
        for row, (seq, _) in enumerate(rows):
            ref = hf_reference(torch.tensor([seq.token_ids])).logits[0, -1]
            assert torch.allclose(result.logits[row], ref, atol=1e-4), (result.logits[row] - ref).abs().max()
    assert len(rows) >= 2


@pytest.mark.parametrize("threshold, chunks", [(0, [64]), (40, [40, 24])])
def test_long_prefill_token_threshold(make_engine, prompts, threshold, chunks):
    """vLLM's meaning: 0 (the default) caps nothing, prompts prefill first come first served; a threshold caps each
    prefill's chunk while another prefill waits."""
    engine = make_engine(max_num_batched_tokens=64, long_prefill_token_threshold=threshold)
    for p in (prompts[3][:100], prompts[2][:70]):
        engine.add_request(p, GREEDY)
    assert [n for _, n in engine.scheduler.schedule().scheduled] == chunks


def test_abort_frees_blocks_at_once(make_engine, prompts):
    engine = make_engine()
    rid = engine.add_request(prompts[4], SamplingParams(max_tokens=8))
    other = engine.add_request(prompts[1], GREEDY)
    engine.step()
    assert engine.usage().used > 0
    assert engine.abort(rid)
    assert engine.kv_manager.num_held_blocks(rid) == 0
    while engine.has_unfinished_requests():
        engine.step()
    assert other not in engine.requests
    _assert_all_free(engine)
