"""Triton K3: InfLLM-V2's block-sparse prefill (stage 2), the kernel beside `block_sparse.sparse_prefill`.

Grid (query group x sub-tile, KV head). A query group is the step's queries inside one selection block; a
program takes `BLOCK_Q` of them with the query heads of a KV group and walks the cache blocks of the group's k
selected blocks (ascending, its own block last, causal only there), reading K/V in place. Selection (stage 1)
stays in `block_sparse.py`, so ties break as `select_blocks` breaks them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attention_backends.kernels.triton_common import attend_tile, finish, key_strides, load_kv, pow2, softmax_state

BLOCK_M = 64
BLOCK_N = 32


@triton.jit
def _block_sparse(q, k_cache, v_cache, pages, out, scale, start, length, first_group, s_qh, s_qt, s_oh, s_ot,
                  s_ph, s_pm, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, G: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_Q: tl.constexpr, SUB: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                  BLOCK_D: tl.constexpr, BS: tl.constexpr, BLOCK: tl.constexpr, K: tl.constexpr):
    pid, h = tl.program_id(0), tl.program_id(1)
    group, sub = pid // SUB, pid % SUB
    r = tl.arange(0, BLOCK_M)
    tq = sub * BLOCK_Q + r // G  # query index inside the selection block
    qpos = (first_group + group) * BLOCK + tq
    head = h * G + r % G
    rmask = (r < BLOCK_Q * G) & (tq < BLOCK) & (qpos >= start) & (qpos < start + length)
    row = qpos - start
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < D
    qt = tl.load(q + head[:, None] * s_qh + row[:, None] * s_qt + dims[None, :], mask=rmask[:, None] & dmask[None, :],
                 other=0.0)
    plist = pages + h * s_ph + group * s_pm
    tail = (K - 1) * BLOCK  # the group's own block starts here in its key list
    end = tl.minimum(K * BLOCK, tail + (sub + 1) * BLOCK_Q)  # past the tile's last query nothing is visible
    m_i, l_i, acc = softmax_state(BLOCK_M, BLOCK_D)
    for j in range(0, end, BLOCK_N):
        idx = j + tl.arange(0, BLOCK_N)
        valid = idx < end
        kt, vt = load_kv(k_cache, v_cache, plist, idx, valid, h, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, dims, dmask, BS)
        causal = (idx[None, :] < tail) | (idx[None, :] - tail <= tq[:, None])
        m_i, l_i, acc = attend_tile(qt, kt, vt, rmask[:, None] & valid[None, :] & causal, m_i, l_i, acc, scale)
    o, _ = finish(m_i, l_i, acc)
    tl.store(out + head[:, None] * s_oh + row[:, None] * s_ot + dims[None, :], o.to(out.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pages: torch.Tensor, start: int,
           first_group: int, block: int, k: int, scale: float) -> torch.Tensor:
    """q `[H_q, T, D]` at positions `start..`; pages `[H_kv, M, k * block / block_size]`: the cache blocks of each
    query group's selected blocks, groups `first_group..` -> `[H_q, T, D]`."""
    hq, t, d = q.shape
    hkv, bs = k_cache.shape[2], k_cache.shape[1]
    g = hq // hkv
    bq = max(1, BLOCK_M // g)
    sub = triton.cdiv(block, bq)
    out = torch.empty_like(q)
    pages = pages.to(q.device, torch.int32).contiguous()
    _block_sparse[(pages.shape[1] * sub, hkv)](
        q, k_cache, v_cache, pages, out, scale, start, t, first_group, q.stride(0), q.stride(1), out.stride(0),
        out.stride(1), pages.stride(0), pages.stride(1), *key_strides(k_cache), *key_strides(v_cache), G=g,
        BLOCK_M=pow2(g * bq), BLOCK_Q=bq, SUB=sub, BLOCK_N=BLOCK_N, D=d, BLOCK_D=pow2(d), BS=bs, BLOCK=block, K=k)
    return out
