"""Sparse backends never hurt short prompts: below its floor each served recipe computes what `dense` computes, so
its greedy tokens are dense's (Loki and TCA under `dense_len`, InfLLM-V2 under its own, SWAA within its window,
Star within one block); and through the server, short factual questions get dense's answer on every recipe."""

from __future__ import annotations

import pytest
from backend_harness import ROOT, assert_same_as_dense, greedy_with_logprobs, serve_default_recipes
from conftest import natural_text

from server.config import read_config_file

RECIPES = [r for r in read_config_file(ROOT / "configs/default.yaml")["served_models"]
           if r["attention_backend"] != "dense"]
QUESTIONS = ["What is the capital of Japan?", "What is the largest planet in the solar system?",
             "Who wrote the play Romeo and Juliet?"]


pytestmark = pytest.mark.usefixtures("calibration_cache")


@pytest.fixture(scope="module")
def prompts(loaded):
    """A 37-token chat question and ~820 tokens of prose: below every recipe's floor."""
    tok = loaded.tokenizer
    chat = tok.encode(tok.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], tokenize=False,
                                              add_generation_prompt=True), add_special_tokens=False)
    return [chat, tok.encode(natural_text(36, 61))]


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine(max_num_batched_tokens=512)


@pytest.fixture(scope="module")
def dense(engine, prompts):
    assert max(len(p) for p in prompts) + 12 < 1024  # under the smallest floor (SWAA's window)
    return greedy_with_logprobs(engine, prompts)


@pytest.mark.parametrize("recipe", RECIPES, ids=[r["name"] for r in RECIPES])
def test_below_the_floor_is_dense(engine, prompts, dense, recipe):
    """The prose is prefilled in 512-token chunks, so chunked prefill is below the floor too."""
    assert_same_as_dense(dense, greedy_with_logprobs(engine, prompts, attention_backend=recipe["attention_backend"],
                                                     attention_params=recipe["attention_params"]))


def test_short_questions_get_dense_answers_on_every_served_recipe(start_server):
    server, client, recipes = serve_default_recipes(start_server)

    def answer(model: str, question: str) -> str:
        return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                              max_tokens=24, temperature=0).choices[0].message.content

    dense = {q: answer("smollm2-135m", q) for q in QUESTIONS}
    assert "Tokyo" in dense[QUESTIONS[0]]
    for recipe in recipes:
        for q in QUESTIONS:
            assert answer(recipe["name"], q) == dense[q], (recipe["name"], q)
