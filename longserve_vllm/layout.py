"""vLLM's per-layer KV cache as the kernel layer's `(k_cache, v_cache)` pair, `[num_blocks, block_size, H_kv, D]`
views of any strides: no copy, so longserve's ops read what vLLM wrote where it lies.

vLLM 0.32 gives a layer one tensor of logical shape `[num_blocks, H_kv, block_size, 2 * D]`, K and V fused per
cell. On CUDA the two halves of the last axis are K and V. On the CPU each (block, head) holds its `block_size * D`
keys and then its values, and vLLM's writer packs the keys by ISA: the `vec` and `vec16` ISAs (AVX2, AVX-512 and
generic x86 in float32, float16, bfloat16) store them transposed, `[D, block_size]`, the values row-major. Other ISAs
(AMX's bf16 tiles, NEON, ...) pack keys their own way, which no strided view describes, so they are refused. A
longserve backend that writes its cache itself (`ROWS`, LONGSERVE_LOKI) stores the keys row-major like the values.
"""

from __future__ import annotations

import torch

CPU_PACKINGS = ("vec", "vec16")  # the CPU ISAs whose key packing is a transpose
ROWS = "rows"  # keys row by row, written by a longserve backend itself


def cache_views(kv_cache: torch.Tensor, head_size: int, packing: str | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of a layer's cache. `packing`: None for a CUDA cache; on the CPU the ISA vLLM's writer packs keys
    with, or `ROWS`."""
    if packing is None:
        k, v = kv_cache.transpose(1, 2).split(head_size, dim=-1)
        return k, v
    nb, hkv, bs, _ = kv_cache.shape
    halves = kv_cache.view(nb, hkv, 2, bs * head_size)
    v = halves[:, :, 1].unflatten(-1, (bs, head_size)).transpose(1, 2)  # [nb, H, bs, D] -> [nb, bs, H, D]
    if packing == ROWS:
        return halves[:, :, 0].unflatten(-1, (bs, head_size)).transpose(1, 2), v
    check_cpu_isa(packing)
    k = halves[:, :, 0].unflatten(-1, (head_size, bs)).permute(0, 3, 1, 2)  # [nb, H, D, bs] -> [nb, bs, H, D]
    return k, v


def check_cpu_isa(isa: str) -> None:
    if isa not in CPU_PACKINGS:
        raise ValueError(f"longserve reads vLLM's CPU KV cache in the {' and '.join(CPU_PACKINGS)} packings; this "
                         f"machine's attention ISA is {isa!r} (AMX is chosen for bfloat16): serve with --dtype float32")
