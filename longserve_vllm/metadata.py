"""vLLM's per-step attention metadata as longserve rows, and the plans every layer of a step shares.

vLLM's `CommonAttentionMetadata` describes a step by tensors: where each request's queries start in the packed batch,
its sequence length once the step has run, its block table and whether it is still prefilling. No request id or
request field reaches a backend, and the prompt length only when the model runner is asked for it (`rswa_prefix_lens`,
which LONGSERVE_STAR turns on), so a row's phase and position are what most methods decide by.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch

from attention_backends.kernels.paged import cdiv


@dataclass(frozen=True, slots=True)
class StepRow:
    """One request's queries: rows `[row, row + length)` of the packed batch at positions `[start, start + length)`,
    over the blocks of its table that hold them and the keys before them."""

    row: int
    block_table: torch.Tensor
    start: int
    length: int
    prefilling: bool
    prompt_len: int | None = None  # when vLLM passes prompt lengths


def step_rows(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor, block_size: int,
              num_reqs: int, is_prefilling: torch.Tensor | None = None, prompt_lens: torch.Tensor | None = None
              ) -> list[StepRow]:
    """Rows of a step from host copies of vLLM's tensors (`query_start_loc` `[R + 1]`, `seq_lens` `[R]`, `block_table`
    `[R, N]`). Without `is_prefilling` a request with one query is taken for a decode. Padding rows (no query)
    are skipped."""
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    flags = is_prefilling.tolist() if is_prefilling is not None else None
    prompts = prompt_lens.tolist() if prompt_lens is not None else None
    rows = []
    for i in range(num_reqs):
        length = starts[i + 1] - starts[i]
        if length <= 0:
            continue
        seq_len = lens[i]
        rows.append(StepRow(starts[i], block_table[i, : cdiv(seq_len, block_size)], seq_len - length, length,
                            bool(flags[i]) if flags is not None else length > 1,
                            prompts[i] if prompts is not None else None))
    return rows


@dataclass(frozen=True, slots=True)
class RangeMetadata:
    """A step's plans, one per kind of layer (a kind is whatever decides which keys a layer's queries see: its own
    sliding window, whether SWAA windows it), shared by every layer of that kind: a `RangeWork`, or a method's
    own plan around one."""

    num_actual_tokens: int
    work: dict[Hashable, Any]
