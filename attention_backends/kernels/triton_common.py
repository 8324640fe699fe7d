"""What the Triton kernels share: the online-softmax update of one key tile, and launch-side helpers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def attend_tile(q, k, v, visible, m_i, l_i, acc, scale):
    """One key tile of an online softmax: q `[R, D]`, k and v `[N, D]`, visible `[R, N]`; the running max `m_i` and
    sum `l_i` `[R]` and output `acc` `[R, D]` (float32), updated. Rows that see nothing so far stay at 0."""
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def finish(m_i, l_i, acc):
    """The normalised output `[R, D]` and natural-log LSE `[R]` of a finished online softmax (0 and -inf for a
    row that saw no key)."""
    seen = l_i > 0
    den = tl.where(seen, l_i, 1.0)
    return tl.where(seen[:, None], acc / den[:, None], 0.0), tl.where(seen, m_i + tl.log(den), float("-inf"))


def pow2(n: int, floor: int = 16) -> int:
    """The tile size that holds n: a power of two, at least `floor` (tl.dot needs 16 on NVIDIA)."""
    return max(floor, triton.next_power_of_2(n))


def key_strides(cache: torch.Tensor) -> tuple[int, int, int]:
    """A cache's block, offset and head strides; its head dimension must be contiguous."""
    if cache.stride(-1) != 1:
        raise ValueError("a KV cache's head dimension must be contiguous")
    return cache.stride(0), cache.stride(1), cache.stride(2)


@triton.jit
def softmax_state(R: tl.constexpr, D: tl.constexpr):
    """An empty online softmax over R rows: running max, sum and output."""
    return tl.full([R], float("-inf"), tl.float32), tl.zeros([R], tl.float32), tl.zeros([R, D], tl.float32)


@triton.jit
def load_kv_at(k_cache, v_cache, block, off, valid, h, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, dims, dmask):
    """K and V `[N, D]` of KV head h at cache blocks `block` (int64), offsets `off`; 0 where not `valid`."""
    kmask = valid[:, None] & dmask[None, :]
    k = tl.load(k_cache + (block * s_kb + off * s_ks + h * s_kh)[:, None] + dims[None, :], mask=kmask, other=0.0)
    v = tl.load(v_cache + (block * s_vb + off * s_vs + h * s_vh)[:, None] + dims[None, :], mask=kmask, other=0.0)
    return k, v


@triton.jit
def load_kv(k_cache, v_cache, table, pos, valid, h, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, dims, dmask,
            BS: tl.constexpr):
    """K and V `[N, D]` of KV head h at positions `pos` of the sequence whose block table is at `table`."""
    block = tl.load(table + pos // BS, mask=valid, other=0).to(tl.int64)
    return load_kv_at(k_cache, v_cache, block, pos % BS, valid, h, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, dims, dmask)


@triton.jit
def load_kv_kept(k_cache, v_cache, keep, table, pos, valid, front, h, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, dims,
                 dmask, BS: tl.constexpr, HKV: tl.constexpr, KEEP: tl.constexpr):
    """`load_kv`, and which keys KV head h sees: the `valid` ones, less, with KEEP, those in `front` that `keep` (a
    bool `[num_blocks, BS, HKV]` mask, TCA's kept tokens) does not hold."""
    block = tl.load(table + pos // BS, mask=valid, other=0).to(tl.int64)
    k, v = load_kv_at(k_cache, v_cache, block, pos % BS, valid, h, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, dims, dmask)
    seen = valid
    if KEEP:
        kept = tl.load(keep + (block * BS + pos % BS) * HKV + h, mask=valid & front, other=1)
        seen = valid & (kept != 0)
    return k, v, seen
