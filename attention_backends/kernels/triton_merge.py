"""Triton K5: the exact merge of attention over shards of the keys (split-K partials, Star Attention's ranks).

The same rule as `merge.merge_attention_states`: weights `exp(LSE_s - max_s LSE_s)`, an empty shard (LSE -inf)
weighs 0, a row whose every shard is empty stays zero with LSE -inf. Rows run `BLOCK_R` to a program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_R = 16


@triton.jit
def _merge(outs, lses, out, lse, rows, stride_os, stride_or, stride_ls, stride_mr,
           S: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = r < rows
    dims = tl.arange(0, D)
    top = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for s in tl.static_range(S):
        top = tl.maximum(top, tl.load(lses + s * stride_ls + r, mask=live, other=float("-inf")))
    safe = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, D], tl.float32)
    for s in tl.static_range(S):
        w = tl.exp(tl.load(lses + s * stride_ls + r, mask=live, other=float("-inf")) - safe)
        part = tl.load(outs + s * stride_os + r[:, None] * stride_or + dims[None, :], mask=live[:, None], other=0.0)
        total += w
        acc += w[:, None] * part.to(tl.float32)
    seen = total > 0
    merged = tl.where(seen[:, None], acc / tl.where(seen, total, 1.0)[:, None], 0.0)
    tl.store(out + r[:, None] * stride_mr + dims[None, :], merged, mask=live[:, None])
    tl.store(lse + r, tl.where(seen, safe + tl.log(tl.where(seen, total, 1.0)), float("-inf")), mask=live)


def merge_attention_states(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """outs `[S, ..., D]`, lses `[S, ...]` -> `[..., D]` float32 and `[...]`, as the reference op."""
    s, d = outs.shape[0], outs.shape[-1]
    lead = outs.shape[1:-1]
    o = outs.reshape(s, -1, d).contiguous()
    ls = lses.reshape(s, -1).float().contiguous()
    rows = o.shape[1]
    out = torch.empty(rows, d, dtype=torch.float32, device=outs.device)
    lse = torch.empty(rows, dtype=torch.float32, device=outs.device)
    if rows:
        _merge[(triton.cdiv(rows, BLOCK_R),)](o, ls, out, lse, rows, o.stride(0), o.stride(1), ls.stride(0),
                                              out.stride(0), S=s, D=d, BLOCK_R=BLOCK_R)
    return out.view(*lead, d), lse.view(lead)
