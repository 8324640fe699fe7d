"""Triton K4: attention over per-head slot lists, the kernel beside `slots.slot_attention`.

Grid (query row, key set). A program packs the query heads that read one set into a 16-row tile and walks the
row's slot list of that set (Loki's kept tokens, InfLLM-V2's selected blocks), reading K/V in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attention_backends.kernels.triton_common import attend_tile, finish, key_strides, load_kv_at, pow2, softmax_state

BLOCK_N = 32


@triton.jit
def _slots(q, k_cache, v_cache, slots, visible, out, scale, m_slots, s_qh, s_qn, s_ss, s_sn, s_vs, s_vn, s_oh, s_on,
           s_kb, s_ks, s_kh, s_vb, s_vsl, s_vh, HEADS: tl.constexpr, SETS_PER_KV: tl.constexpr,
           BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr):
    i, s = tl.program_id(0), tl.program_id(1)
    h = s // SETS_PER_KV  # the KV head this set's keys come from
    r = tl.arange(0, BLOCK_H)
    heads = s * HEADS + r
    hmask = r < HEADS
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < D
    qt = tl.load(q + heads[:, None] * s_qh + i * s_qn + dims[None, :], mask=hmask[:, None] & dmask[None, :],
                 other=0.0)
    m_i, l_i, acc = softmax_state(BLOCK_H, BLOCK_D)
    for j in range(0, m_slots, BLOCK_N):
        idx = j + tl.arange(0, BLOCK_N)
        valid = idx < m_slots
        slot = tl.load(slots + s * s_ss + i * s_sn + idx, mask=valid, other=0).to(tl.int64)
        seen = tl.load(visible + s * s_vs + i * s_vn + idx, mask=valid, other=0) != 0
        kt, vt = load_kv_at(k_cache, v_cache, slot // BS, slot % BS, valid, h, s_kb, s_ks, s_kh, s_vb, s_vsl, s_vh,
                            dims, dmask)
        m_i, l_i, acc = attend_tile(qt, kt, vt, hmask[:, None] & (valid & seen)[None, :], m_i, l_i, acc, scale)
    o, _ = finish(m_i, l_i, acc)
    tl.store(out + heads[:, None] * s_oh + i * s_on + dims[None, :], o.to(out.dtype.element_ty),
             mask=hmask[:, None] & dmask[None, :])


def slot_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                   visible: torch.Tensor, scale: float) -> torch.Tensor:
    """As `slots.slot_attention`: q `[H_q, n, D]`, slots and visible `[S, n, m]` on q's device."""
    hq, n, d = q.shape
    sets, _, m_slots = slots.shape
    hkv, bs = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty_like(q)
    slots = slots.to(torch.int32)
    visible = visible.to(torch.int8)
    _slots[(n, sets)](q, k_cache, v_cache, slots, visible, out, scale, m_slots, q.stride(0), q.stride(1),
                      slots.stride(0), slots.stride(1), visible.stride(0), visible.stride(1), out.stride(0),
                      out.stride(1), *key_strides(k_cache), *key_strides(v_cache), HEADS=hq // sets,
                      SETS_PER_KV=sets // hkv, BLOCK_H=pow2(hq // sets), BLOCK_N=BLOCK_N, D=d, BLOCK_D=pow2(d), BS=bs)
    return out
