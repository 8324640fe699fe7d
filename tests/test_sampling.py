"""Sampling params validation, seeded reproducibility, stops, detokenization, request validation."""

from __future__ import annotations

import pytest
import torch

from attention_backends.base import NoParams
from attention_backends.registry import BackendError
from engine.sampler import Sampler, invert_cdf
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"stop": 5}, "stop must be a string or a list of strings"),
        ({"stop": ["ok", 3]}, "stop must be"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"logprobs": 50}, "logprobs"),
        ({"n": 0}, "n must be"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {3: float("nan")}}, "logit_bias"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [4, -4]}, "allowed_token_ids"),
    ],
)
def test_invalid_params_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_inverting_the_cdf_draws_each_token_with_its_probability():
    """Uniforms evenly spread over [0, 1) draw each token a number of times its probability of them (to one draw:
    float32 sums), and the extremes of [0, 1) never draw a token of probability 0, before, between or after the
    others, nor past the vocabulary."""
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.25, 0.15, 0.1, 0.0]]) * 3  # any total mass
    n = 10_000
    uniforms = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    drawn = invert_cdf(probs.expand(n, -1), uniforms.float())
    counts = torch.bincount(drawn, minlength=probs.shape[1])
    assert counts.numel() == probs.shape[1]
    assert (counts - probs[0] / probs.sum() * n).abs().max() <= 1
    extremes = torch.tensor([0.0, 2.0**-24, 1 - 2.0**-24])  # torch.rand's least and greatest
    for row in (probs, torch.tensor([[0.0, 0.0, 1.0, 0.0]]), torch.tensor([[0.3, 0.7 - 1e-7, 0.0, 0.0]]),
                torch.tensor([[0.0, 1.5 + 2.0**-22, 0.0]])):
        drawn = invert_cdf(row.expand(len(extremes), -1), extremes)
        assert (row[0, drawn] > 0).all(), (row, drawn)


def test_inverting_in_blocks_draws_each_token_with_its_probability():
    """A vocabulary of 24 is inverted in three blocks of 8: whole blocks of probability 0, and tokens of probability
    0 at the blocks' edges, are never drawn; every other token as often as its probability says, to one draw."""
    probs = torch.rand(24, generator=torch.Generator().manual_seed(1))
    probs[[0, 7, 8, 15, 23]] = 0.0
    n = 20_000
    uniforms = ((torch.arange(n, dtype=torch.float64) + 0.5) / n).float()
    counts = torch.bincount(invert_cdf(probs.expand(n, -1), uniforms), minlength=24)
    assert counts.numel() == 24 and (counts - probs / probs.sum() * n).abs().max() <= 1
    extremes = torch.tensor([0.0, 2.0**-24, 0.5, 1 - 2.0**-24])
    middle_empty = torch.zeros(24)
    middle_empty[[3, 17]] = torch.tensor([0.4, 1.1])
    last_only = torch.zeros(24)
    last_only[[6, 22]] = torch.tensor([1.0, 1e-6])
    for row in (probs, middle_empty, last_only):
        drawn = invert_cdf(row.expand(len(extremes), -1), extremes)
        assert (row[drawn] > 0).all(), (row, drawn)
    # Masses spread over six orders of magnitude: the middle block's own running sums round below the target its
    # mass passed at the greatest uniform, which draws the block's last token (not the empty block after it).
    spread = torch.tensor([5.083924770588055e-05, 0.026296138763427734, 0.08404526114463806, 4.967587471008301,
                           25.147682189941406, 0.0011684411438181996, 0.32073974609375, 0.007799589540809393,
                           0.0003985816438216716, 774.2030029296875, 0.0007703205919824541, 0.17784059047698975,
                           0.8118910193443298, 0.0010874527506530285, 394.29486083984375, 0.2972636818885803,
                           *[0.0] * 8])
    assert invert_cdf(spread.unsqueeze(0), torch.tensor([1 - 2.0**-24])).tolist() == [15]


def test_params_at_the_edge_of_float32_draw_what_their_limit_would():
    """Found by the schema test: top_p = 5e-324 is 0 in float32, which dropped every token (it keeps the most likely
    one); repetition_penalty = 5e-324 divided a seen token's logit to infinity and softmax to NaN (the seen token
    takes all the mass). Non-finite probabilities are refused by name rather than drawing past the vocabulary."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    logits[:, 7] = 0.5

    def draw(**params: float) -> list[int]:
        sp = SamplingParams(temperature=0.5, max_tokens=4, **params)
        return Sampler(set())(logits, [Sequence(f"r{i}", [7], sp, "dense", NoParams(), 5) for i in range(3)])[0]

    assert draw(top_p=5e-324) == logits.argmax(dim=-1).tolist()
    assert draw(repetition_penalty=5e-324) == [7, 7, 7]
    with pytest.raises(ValueError, match="not finite"):
        invert_cdf(torch.tensor([[0.5, float("nan")]]), torch.tensor([0.5]))


def test_seeded_sampling_is_reproducible_and_batch_independent(make_engine):
    engine = make_engine()
    prompt = "Write a short story about a lighthouse keeper."
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=24, ignore_eos=True)
    alone = engine.generate([prompt], sp)[0].token_ids
    crowd = engine.generate(["Unrelated prompt number one.", prompt, "Another one, longer, about ships and the sea."],
                            [SamplingParams(temperature=1.0, max_tokens=30), sp, SamplingParams(temperature=0.7)])
    assert crowd[1].token_ids == alone
    other = engine.generate([prompt], SamplingParams(temperature=1.0, seed=99, max_tokens=24, ignore_eos=True))
    assert other[0].token_ids != alone


def test_top_k_past_the_vocabulary_keeps_every_token(make_engine):
    # Found by the schema fuzzer: top_k = 2**63 passed validation and overflowed the sampler's int64 tensor.
    engine = make_engine()
    prompt = "Write a short story about a lighthouse keeper."
    runs = [engine.generate([prompt], SamplingParams(temperature=1.0, top_k=k, seed=7, max_tokens=12,
                                                     ignore_eos=True))[0].token_ids
            for k in (0, 2**63, 10**6)]
    assert runs[1] == runs[0] and runs[2] == runs[0]


def test_penalties_min_p_and_logprobs(make_engine):
    engine = make_engine()
    sp = SamplingParams(temperature=0.8, min_p=0.05, repetition_penalty=1.3, frequency_penalty=0.5,
                        presence_penalty=0.5, seed=3, max_tokens=12, logprobs=3, ignore_eos=True)
    out = engine.generate(["List some fruits: apple, apple, apple,"], sp)[0]
    assert len(out.token_ids) == 12
    greedy = engine.generate(["The sky is"], SamplingParams(temperature=0, max_tokens=3, logprobs=2))[0]
    assert greedy.finished


def test_allowed_tokens_and_logit_bias_steer_every_draw(make_engine):
    engine = make_engine()
    prompt = "Write a short story about a lighthouse keeper."

    def tokens(**kwargs) -> list[int]:
        return engine.generate([prompt], SamplingParams(max_tokens=6, ignore_eos=True, **kwargs))[0].token_ids

    base = tokens(temperature=0)
    assert tokens(temperature=0, logit_bias={42: 100.0}) == [42] * 6  # beats every logit, step after step
    assert tokens(temperature=0, logit_bias={base[0]: -100.0})[0] != base[0]
    others = sorted(set(base[1:]) - {base[0]})  # tokens the model likes here: a random draw spreads over them
    assert len(others) > 1
    allowed = [*others, base[0]]
    assert tokens(temperature=0, allowed_token_ids=allowed)[0] == base[0]  # the argmax is allowed: it stays
    # Within the allowed tokens the bias still decides, and a random draw never leaves them.
    assert tokens(temperature=0, allowed_token_ids=others, logit_bias={others[1]: 100.0}) == [others[1]] * 6
    drawn = engine.generate([prompt], SamplingParams(temperature=1.0, seed=5, max_tokens=24, ignore_eos=True,
                                                     allowed_token_ids=others))[0].token_ids
    assert set(drawn) <= set(others) and len(set(drawn)) > 1
    assert engine.usage().used == 0


def test_logprobs_report_the_sampled_token(make_engine):
    engine = make_engine()
    rid = engine.add_request("The sky is", SamplingParams(temperature=0, max_tokens=3, logprobs=2))
    seen = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == rid
            seen.extend(out.logprobs)
    assert len(seen) == 3
    for lp in seen:
        assert lp.rank == 1 and lp.top[0][0] == lp.token_id and lp.logprob <= 0 and len(lp.top) == 2


def test_stop_strings_and_stop_tokens(make_engine):
    engine = make_engine()
    base = engine.generate(["Count: one, two, three,"], SamplingParams(temperature=0, max_tokens=20))[0]
    assert len(base.text) > 4
    stop = base.text[2:4]
    out = engine.generate(["Count: one, two, three,"], SamplingParams(temperature=0, max_tokens=20, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == base.text[: base.text.index(stop)]
    tok = base.token_ids[3]
    out = engine.generate(["Count: one, two, three,"],
                          SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[tok]))[0]
    assert out.stop_reason == tok and out.token_ids == base.token_ids[: base.token_ids.index(tok) + 1]
    assert engine.usage().used == 0


def test_streamed_text_equals_final_text(make_engine):
    engine = make_engine()
    rid = engine.add_request("Tell me about Paris in one sentence. Café, naïve, 東京.",
                             SamplingParams(temperature=0, max_tokens=40, stop=["zzzz"], ignore_eos=True))
    pieces, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            pieces.append(out.new_text)
            final = out
    assert final is not None and final.request_id == rid
    assert "".join(pieces) == final.text == engine.tokenizer.decode(final.token_ids, skip_special_tokens=True)
    assert final.finish_reason == "length"


def test_request_validation(make_engine):
    engine = make_engine()
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="maximum context length is 4096"):
        engine.add_request([1] * 4000, SamplingParams(max_tokens=200))
    with pytest.raises(ValueError, match=r"stop_token_ids must be in \[0, 49152\)"):
        engine.add_request("hi", SamplingParams(stop_token_ids=[49152], min_tokens=2))
    with pytest.raises(ValueError, match=r"logit_bias token ids must be in \[0, 49152\)"):
        engine.add_request("hi", SamplingParams(logit_bias={49152: 1.0}))
    with pytest.raises(ValueError, match=r"allowed_token_ids must be in \[0, 49152\)"):
        engine.add_request("hi", SamplingParams(allowed_token_ids=[5, 49152]))
    eos = next(iter(engine.eos_token_ids))
    with pytest.raises(ValueError, match="no token is left"):  # min_tokens bans every allowed token
        engine.add_request("hi", SamplingParams(allowed_token_ids=[eos, 7], stop_token_ids=[7], min_tokens=1))
    engine.new_sequence("hi", SamplingParams(allowed_token_ids=[eos], min_tokens=1, ignore_eos=True, max_tokens=2))
    with pytest.raises(BackendError, match="registered: dense"):
        engine.add_request("hi", attention_backend="nope")
    with pytest.raises(BackendError, match="invalid attention_params"):
        engine.add_request("hi", attention_backend="dense", attention_params={"window": 3})
    assert not engine.has_unfinished_requests()
