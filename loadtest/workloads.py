"""Long-context prompts at an exact token length, with needles at a chosen depth and the expected answers.

Depth is the needle's position within the haystack, in tokens (the instruction and question excluded),
snapped to the nearest sentence start so no sentence is cut. `offset` instead places a needle at an exact
haystack token offset, e.g. on a KV-block (multiple of 16) or window boundary. Lengths count the whole
chat prompt, template included, and are checked after construction (within 1%). Exactness wins over
form at the end of the haystack: its last unit (a sentence, or a JSON pair of the kv task) may be cut.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field

from loadtest.tokens import Tokenizer

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_SUBJECTS = ["The old miller", "A quiet student", "The harbor pilot", "My neighbour", "The village baker",
             "A young painter", "The night guard", "An old sailor", "The librarian", "A travelling merchant"]
_VERBS = ["repaired", "admired", "carried", "measured", "described", "painted", "forgot", "visited", "sold",
          "counted"]
_OBJECTS = ["the wooden bridge", "a blue lantern", "the stone tower", "three copper bells", "the long garden",
            "a map of the coast", "the broken clock", "an empty barrel", "the winter orchard", "a red kite"]
_WHEN = ["in the morning", "after the storm", "before supper", "on a Sunday", "during the fair", "at dusk"]
WORDS = ["apple", "river", "candle", "falcon", "marble", "violet", "thunder", "pepper", "meadow", "copper",
         "lantern", "harbor", "willow", "saddle", "glacier", "orchid", "velvet", "cobalt", "ember", "quartz"]
# Short factual questions, each well under 64 tokens: a long-context method must not change their answers.
SHORT_LIMIT = 64
SHORT_QUESTIONS = ["What is the capital of Japan?", "What is the largest planet in the solar system?",
                   "Who wrote the play Romeo and Juliet?", "How many legs does a spider have?",
                   "What is the boiling point of water at sea level in degrees Celsius?"]


def text_haystack(num_sentences: int, rng: random.Random) -> str:
    """Varied natural sentences from a small grammar: shipped with the code, nothing downloaded."""
    return " ".join(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_WHEN)}."
                    for _ in range(num_sentences)) + " "


@dataclass
class Sample:
    task: str
    messages: list[dict]
    answers: list[str]  # every one must appear in the output (passkey: the first integer must equal it)
    target_tokens: int
    prompt_tokens: int
    depth: float  # needle start / haystack tokens (the first needle for several)
    needle_offsets: list[int] = field(default_factory=list)  # haystack token offsets of the needles
    max_tokens: int = 32


@dataclass
class Task:
    """What a task puts in the haystack and asks: needles (texts), their answers, the question."""

    name: str
    needles: list[str]
    answers: list[str]
    question: str
    haystack: str  # "noise" or "text"
    max_tokens: int = 32
    preamble: str = ""  # before the haystack (e.g. a JSON object's opening)
    closing: str = ""


def make_task(name: str, rng: random.Random, num_keys: int = 1, num_values: int = 1) -> Task:
    if name == "passkey":  # seven digits, said once: a model must keep every digit from one place
        key = str(rng.randint(1000000, 9999999))
        return Task(name, [f" The pass key is {key}. "], [key], "What is the pass key? Answer with the number only.",
                    "noise", 16)
    if name == "niah_text":  # a seven-digit code stated once in prose, among prose (other keys' codes: decoys)
        keys = rng.sample(WORDS, num_keys)
        values = [[str(rng.randint(1000000, 9999999)) for _ in range(num_values)] for _ in keys]
        needles = [f" {rng.choice(_SUBJECTS)} wrote down that the code to the {k} safe is {v}. "
                   for k, vs in zip(keys, values) for v in vs]
        rng.shuffle(needles)
        ask = (f"What is the code to the {keys[0]} safe? Answer with the number only." if num_values == 1 else
               f"What are all the codes to the {keys[0]} safe? Answer with the numbers only.")
        return Task(name, needles, values[0], ask, "text", 24 * num_values)
    if name == "niah":
        keys = rng.sample(WORDS, num_keys)  # the first is asked for; the others are decoys
        values = [[str(rng.randint(1000000, 9999999)) for _ in range(num_values)] for _ in keys]
        needles = [f" One of the special magic numbers for {k} is: {v}. " for k, vs in zip(keys, values) for v in vs]
        rng.shuffle(needles)
        ask = "numbers" if num_values > 1 else "number"
        return Task(name, needles, values[0], f"What are all the special magic {ask} for {keys[0]} mentioned in "
                    "the text? Answer with the numbers only.", "noise", 32 * num_values)
    if name == "vt":
        value, names = str(rng.randint(10000, 99999)), rng.sample([f"VAR_{w.upper()}" for w in WORDS], 4)
        needles = [f" VAR {names[0]} = {value}. "] + [f" VAR {b} = VAR {a}. " for a, b in zip(names, names[1:])]
        return Task(name, needles, names, f"Which variables are assigned the value {value}, directly or "
                    "through other variables? Answer with the variable names only.", "noise", 40)
    if name == "kv":
        key, value = str(uuid.UUID(int=rng.getrandbits(128))), str(uuid.UUID(int=rng.getrandbits(128)))
        return Task(name, [f'"{key}": "{value}", '], [value], f"What is the value of key {key} in the JSON "
                    "object above? Answer with the value only.", "json", 40, preamble="{", closing="}")
    raise ValueError(f"unknown task {name!r}: passkey, niah, niah_text, vt, kv (short takes no haystack)")


def _filler(kind: str, rng: random.Random, chars: int) -> str:
    if kind == "noise":
        return NOISE * (chars // len(NOISE) + 1)
    if kind == "text":
        return text_haystack(chars // 40 + 1, rng)
    pairs = []  # json: distractor uuid pairs
    while sum(map(len, pairs)) < chars:
        pairs.append(f'"{uuid.UUID(int=rng.getrandbits(128))}": "{uuid.UUID(int=rng.getrandbits(128))}", ')
    return "".join(pairs)


def _boundaries(pieces: list[str], kind: str) -> list[int]:
    """Token offsets where a unit (a sentence, or a JSON pair) starts."""
    mark = "." if kind != "json" else ","
    return [0] + [i + 1 for i, p in enumerate(pieces) if p.rstrip().endswith(mark)]


def build(tok: Tokenizer, task: Task, target_tokens: int, depth: float | None = None, offset: int | None = None,
          rng: random.Random | None = None) -> Sample:
    """A chat prompt of `target_tokens` with the task's needles at `depth` (0..1) or at token `offset`."""
    rng = rng or random.Random(0)
    def render(hay: str) -> list[dict]:
        return [{"role": "user", "content": f"Read the text below and answer the question after it.\n\n"
                                            f"{task.preamble}{hay}{task.closing}\n\n{task.question}"}]

    frame = tok.count_chat(render("".join(task.needles)))
    budget = target_tokens - frame
    if budget < 16:
        raise ValueError(f"{target_tokens} tokens leave no room for a haystack ({frame} for the rest)")
    ids, strs = tok.pieces(_filler(task.haystack, rng, budget * 6))
    for _ in range(4):  # decode/encode at the seams can shift the count by a few tokens: correct and retry
        hay_ids = ids[:budget]
        starts = [s for s in _boundaries(strs[:budget], task.haystack) if s < len(hay_ids)]
        want = offset if offset is not None else int((depth or 0.0) * len(hay_ids))
        cut = want if offset is not None else min(starts, key=lambda s: abs(s - want))
        # several needles: spread evenly from the cut to the end, each on a unit start
        step = max(1, (len(hay_ids) - cut) // len(task.needles))
        cuts = [cut] + [min(starts, key=lambda s, w=cut + i * step: abs(s - w)) for i in range(1, len(task.needles))]
        cuts = sorted(set(cuts)) + [cut] * (len(task.needles) - len(set(cuts)))
        pieces, prev = [], 0
        for c, needle in zip(sorted(cuts), task.needles):
            pieces += [tok.decode(hay_ids[prev:c]), needle]
            prev = c
        pieces.append(tok.decode(hay_ids[prev:]))
        messages = render("".join(pieces))
        count = tok.count_chat(messages)
        if abs(count - target_tokens) <= max(1, target_tokens // 200):
            break
        budget -= count - target_tokens
    return Sample(task.name, messages, task.answers, target_tokens, count, sorted(cuts)[0] / max(1, len(hay_ids)),
                  sorted(cuts), task.max_tokens)


def short_samples(tok: Tokenizer) -> list[Sample]:
    """The short factual questions, each alone in a chat turn. Their answers are not known up front: they are
    scored against a reference model's (dense's) own answers."""
    out = []
    for q in SHORT_QUESTIONS:
        messages = [{"role": "user", "content": q}]
        n = tok.count_chat(messages)
        out.append(Sample("short", messages, [], SHORT_LIMIT, n, 0.0, [], 32))
    return out
