"""ModelRunner: packs a step into one `[1, T]` batch, builds the step context, runs the HF model.

The HF model runs with `use_cache=False`; its attention layers call the function registered in
`attention_backends.hf_attention`, which reads the step context and the paged cache. The runner takes
the scheduled work and returns logits, nothing else, so one runner per torch.distributed rank runs the
same steps. Backends are made here, on first use, under a lock: a request thread may ask for one while the
engine thread runs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from attention_backends.base import AttentionBackend
from attention_backends.context import AttentionSpec, BackendBatch, Phase, SeqStep, StepContext
from attention_backends.hf_attention import step_context
from attention_backends.kernels.paged import position_slots
from attention_backends.registry import get_backend_class
from engine.sequence import Sequence
from kv_cache.paged_kv import PagedKVCache


@dataclass(slots=True)
class StepResult:
    logits: torch.Tensor  # [num sequences that sample, vocab], in scheduled order
    steps: list[tuple[Sequence, SeqStep]]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv: PagedKVCache, spec: AttentionSpec) -> None:
        self.model = model
        self.kv = kv
        self.spec = spec
        self.device = kv.device
        self.backends: dict[str, AttentionBackend] = {}
        self._lock = threading.Lock()

    def backend(self, name: str) -> AttentionBackend:
        impl = self.backends.get(name)
        if impl is None:
            with self._lock:
                impl = self.backends.get(name)
                if impl is None:
                    impl = self.backends[name] = get_backend_class(name)(self.kv, self.spec)
        return impl

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]], block_tables: dict[str, list[int]]) -> StepResult:
        bs = self.spec.block_size
        input_ids: list[int] = []
        positions: list[torch.Tensor] = []
        logits_index: list[int] = []
        groups: dict[str, list[tuple[SeqStep, torch.Tensor, int]]] = {}
        steps = []
        for seq, n in scheduled:
            start, c = len(input_ids), seq.num_computed_tokens
            table = torch.tensor(block_tables[seq.request_id], dtype=torch.long)
            backend = self.backend(seq.backend)
            if seq.backend_state is None:
                seq.backend_state = backend.new_state(seq.backend_params)
            step = SeqStep(request_id=seq.request_id, phase=Phase.DECODE if seq.is_decode(n) else Phase.PREFILL,
                           query_start=0, query_len=n, num_computed_tokens=c, num_new_tokens=n,
                           prompt_len=seq.num_prompt_tokens, block_table=table, params=seq.backend_params,
                           state=seq.backend_state)
            pos = backend.select_rows(step)
            if pos is None:
                pos = torch.arange(c, c + n)
                input_ids.extend(seq.token_ids[c : c + n])
            elif len(pos):
                step.positions, step.query_len = pos, len(pos)
                input_ids.extend(seq.token_ids[p] for p in pos.tolist())
            else:  # another rank runs all of this chunk; the step still counts for blocks_to_release
                step.positions, step.query_len = pos, 0
                steps.append((seq, step))
                continue
            positions.append(pos)
            group = groups.setdefault(seq.backend, [])
            step.query_start = sum(s.query_len for s, _, _ in group)
            group.append((step, position_slots(table, pos, bs), start))
            steps.append((seq, step))
            if c + n == seq.num_tokens:
                logits_index.append(len(input_ids) - 1)
        if not input_ids:
            return StepResult(torch.empty(0, self.model.config.vocab_size), steps)

        batches = {}
        for name, group in groups.items():
            token_index = None
            if len(groups) > 1:
                token_index = torch.cat([torch.arange(start, start + s.query_len) for s, _, start in group])
            batch = BackendBatch([s for s, _, _ in group], torch.cat([slots for _, slots, _ in group]), token_index)
            batch.meta = self.backends[name].prepare(batch)
            batches[name] = batch
        ctx = StepContext(batches, {name: self.backends[name] for name in batches})

        with step_context(ctx):
            out = self.model(
                input_ids=torch.tensor([input_ids], device=self.device),
                position_ids=torch.cat(positions).unsqueeze(0).to(self.device),
                use_cache=False,
                logits_to_keep=torch.tensor(logits_index, dtype=torch.long, device=self.device),
            )
        return StepResult(out.logits[0], steps)
