"""KV caches on 2 MiB pages (Linux's transparent huge pages) on the CPU.

A decode step reads every layer's blocks of each sequence, scattered over the pool, and a sparse decode reads rows
scattered within them (Loki's kept keys: a quarter of each sequence's keys, one 256-byte row here and another
there). On 4 KiB pages such reads miss the TLB and wait for page walks; on 2 MiB pages a layer's blocks are a few
hundred pages, which the TLB holds. Linux backs anonymous memory with huge pages only where a range asks for them
(`madvise`) under its usual `transparent_hugepage=madvise` setting, and a buffer already written (vLLM allocates its
cache with `torch.zeros`) keeps the pages it has: its pages are given back, and fault in again as huge pages where
it is next written. At 8k a layer's C++ decode takes 0.82-0.91x its time on 4 KiB pages, Loki's 0.90-0.91x
(`benchmarks/bench_decode_kernel.py`, BENCHMARKS.md).
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from pathlib import Path

import torch

HUGE_PAGE = 1 << 21
_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_possible() -> bool:
    """Whether this kernel gives transparent huge pages to a range that asks (not `never`)."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in _SETTING.read_text()
    except OSError:  # a kernel built without transparent huge pages
        return False


def back_with_huge_pages(t: torch.Tensor) -> int:
    """Ask Linux to back the 2 MiB-aligned interior of CPU tensor `t`'s storage with huge pages, giving back the pages
    it holds there: what it held reads as zeros after. Call it on a cache nothing is stored in. Returns the bytes
    advised: 0 off Linux, for a GPU tensor, where transparent huge pages are off or the storage spans no whole huge
    page."""
    if t.device.type != "cpu" or not huge_pages_possible():
        return 0
    storage = t.untyped_storage()
    start = -storage.data_ptr() % HUGE_PAGE + storage.data_ptr()
    length = (storage.data_ptr() + storage.nbytes() - start) // HUGE_PAGE * HUGE_PAGE
    if length <= 0:
        return 0
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if madvise(start, length, mmap.MADV_HUGEPAGE) != 0 or madvise(start, length, mmap.MADV_DONTNEED) != 0:
        return 0
    return length


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.zeros` whose CPU storage is backed by huge pages where the OS allows."""
    t = torch.empty(shape, dtype=dtype, device=device)
    back_with_huge_pages(t)
    return t.zero_()
