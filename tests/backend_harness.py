"""Drive a backend through engine-like steps on synthetic tensors, so each layer's output can be compared
with an explicit reference: several sequences share every step, prefill chunks and decodes mixed."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import openai
import torch

from attention_backends.base import AttentionBackend
from attention_backends.context import BackendBatch, Phase, SeqStep
from attention_backends.kernels.huge_pages import HUGE_PAGE
from attention_backends.kernels.paged import context_slots
from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from server.config import read_config_file, served_models_from

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class SynthSeq:
    """q `[layers, H_q, N, D]`, k/v `[layers, H_kv, N, D]` for all N positions the sequence will reach."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    prompt_len: int
    table: torch.Tensor
    done: int = 0
    state: object = None

    @classmethod
    def random(cls, layers: int, hq: int, hkv: int, d: int, length: int, prompt_len: int, first_block: int,
               block_size: int) -> SynthSeq:
        table = torch.arange(first_block, first_block + math.ceil(length / block_size))
        return cls(torch.randn(layers, hq, length, d), torch.randn(layers, hkv, length, d),
                   torch.randn(layers, hkv, length, d), prompt_len, table)


def run_steps(backend: AttentionBackend, seqs: dict[str, SynthSeq], schedule: list[list[tuple[str, int]]], params,
              check: Callable[[int, str, SeqStep, torch.Tensor], None],
              after: Callable[[str, SeqStep], None] | None = None, scale: float | None = None) -> None:
    """Each step of `schedule` lists (sequence, tokens). `check(layer, name, step, out)` sees each sequence's
    rows of each layer's output; `after(name, step)` runs once the step is done, as `blocks_to_release` does
    (the step as it ran: the cache holds `step.end` tokens)."""
    bs = backend.spec.block_size
    scale = scale or backend.spec.head_dim**-0.5
    for work in schedule:
        steps, slots, start = [], [], 0
        for name, n in work:
            s = seqs[name]
            if s.state is None:
                s.state = backend.new_state(params)
            phase = Phase.DECODE if n == 1 and s.done >= s.prompt_len else Phase.PREFILL
            steps.append((name, SeqStep(request_id=name, phase=phase, query_start=start, query_len=n,
                                        num_computed_tokens=s.done, num_new_tokens=n, prompt_len=s.prompt_len,
                                        block_table=s.table, params=params, state=s.state)))
            slots.append(context_slots(s.table, s.done, s.done + n, bs))
            start += n
        batch = BackendBatch([st for _, st in steps], torch.cat(slots), None)
        batch.meta = backend.prepare(batch)
        for layer in range(backend.spec.num_layers):
            q, k, v = (torch.cat([getattr(seqs[nm], t)[layer][:, st.num_computed_tokens : st.context_len]
                                  for nm, st in steps], dim=1) for t in "qkv")
            out = backend.forward(layer, q, k, v, batch, scale)
            for nm, st in steps:
                check(layer, nm, st, out[:, st.query_start : st.query_start + st.query_len])
        for nm, st in steps:
            seqs[nm].done += st.query_len
            if after is not None:
                after(nm, st)


def tiny_llama(path: Path, loaded, hidden_size: int, intermediate_size: int, max_position_embeddings: int):
    """A random 2-layer Llama (4 query / 2 KV heads) saved at `path` with the embedded model's tokenizer, loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.model_loader import load_model

    config = AutoConfig.for_model("llama", hidden_size=hidden_size, intermediate_size=intermediate_size,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=max_position_embeddings, vocab_size=loaded.config.vocab_size)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return load_model(str(path), progress=False)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
                     ) -> torch.Tensor:
    """The explicit reference: q `[H_q, T, D]` over k/v `[H_kv, K, D]` with a bool mask `[T, K]` or
    `[H_q, T, K]`, full score matrix, GQA by repeating K/V."""
    rep = q.shape[0] // k.shape[0]
    kk, vv = (t.repeat_interleave(rep, 0) for t in (k, v))
    return ((q @ kk.transpose(1, 2)) * scale).masked_fill(~mask, float("-inf")).softmax(-1) @ vv


def huge_page_advised(t: torch.Tensor) -> bool:
    """Whether the mapping holding `t`'s storage was advised to take huge pages (the `hg` flag of `/proc/self/smaps`),
    which is what `back_with_huge_pages` asks; whether the kernel found free huge pages for it is its own affair."""
    address, mapping = t.untyped_storage().data_ptr() + HUGE_PAGE, None  # inside the storage's first huge page
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            mapping = lo <= address < hi
        elif mapping and line.startswith("VmFlags:"):
            return "hg" in line.split()[1:]
    return False


def greedy_with_logprobs(engine, prompts: list[list[int]], **backend) -> list[tuple[list[int], list[float]]]:
    """Each prompt's 12 greedy tokens and their logprobs, all prompts in the same steps."""
    return greedy_mixed(engine, [(p, backend) for p in prompts])


def greedy_mixed(engine, requests: list[tuple[list[int], dict]]) -> list[tuple[list[int], list[float]]]:
    """`greedy_with_logprobs` for requests that each name their own backend (keyword arguments of add_request)."""
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    ids = [engine.add_request(p, sp, **backend) for p, backend in requests]
    got = {i: ([], []) for i in ids}
    while engine.has_unfinished_requests():
        for out in engine.step():
            got[out.request_id][0].extend(out.new_token_ids)
            got[out.request_id][1].extend(lp.logprob for lp in out.logprobs)
    return [got[i] for i in ids]


def assert_same_as_dense(dense, other) -> None:
    for (dt, dl), (ot, ol) in zip(dense, other, strict=True):
        assert ot == dt
        # Float32 rounding: two exact paths (dense's prefill merges context and chunk by their log-sum-exps; a
        # backend may mask one tile, rotate keys, attend through slot lists), each within ~1e-5 of a float64
        # reference per layer, reach the 30 layers' logprobs up to ~2e-5 apart.
        assert max(abs(a - b) for a, b in zip(dl, ol)) < 3e-5


def serve_default_recipes(start_server):
    """A server over every recipe of configs/default.yaml, an `openai` client, and the recipes."""
    recipes = read_config_file(ROOT / "configs/default.yaml")["served_models"]
    server = start_server(served_models=served_models_from(recipes, "unused", EngineConfig()))
    return server, openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0), recipes


def assert_recipe_served(server, client, recipes, name: str, prompt: str) -> None:
    """The recipe answers by its model name exactly as the base model does with its backend in extra_body."""
    recipe = next(r for r in recipes if r["name"] == name)
    assert name in {m.id for m in client.models.list().data}
    before = server.metric("longserve:requests_total", attention_backend=recipe["attention_backend"])
    by_name = client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0)
    by_body = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=8, temperature=0,
                                        extra_body={"attention_backend": recipe["attention_backend"],
                                                    "attention_params": recipe["attention_params"]})
    assert by_name.choices[0].text == by_body.choices[0].text and by_name.usage.completion_tokens == 8
    assert server.metric("longserve:requests_total", attention_backend=recipe["attention_backend"]) == before + 2
