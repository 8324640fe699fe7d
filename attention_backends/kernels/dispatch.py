"""Which implementation a kernel-layer op runs: the Triton kernel for tensors on CUDA, the PyTorch reference op
elsewhere. `LONGSERVE_KERNELS=torch|triton` forces one; the tests force Triton on the CPU under the interpreter
(`TRITON_INTERPRET=1`, set in tests/conftest.py before any kernel is defined). Plans are built for one
implementation in `prepare`, so a step never mixes them.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache

import torch

MODES = ("auto", "torch", "triton")


@cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(device: torch.device | str) -> bool:
    mode = os.environ.get("LONGSERVE_KERNELS", "auto")
    if mode not in MODES:
        raise ValueError(f"LONGSERVE_KERNELS must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "torch":
        return False
    if mode == "triton":
        if not _triton_installed():
            raise RuntimeError("LONGSERVE_KERNELS=triton, but triton is not installed")
        return True
    return torch.device(device).type == "cuda" and _triton_installed()


def check_ids(ids: torch.Tensor, limit: int, what: str) -> None:
    """Refuse ids outside `[0, limit)` before a launch: an out-of-range load is no error on a GPU, and kills the
    process under the interpreter. Run on the host copy, which plans keep, so it costs no device sync."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= limit):
        raise IndexError(f"{what} out of range: [{int(ids.min())}, {int(ids.max())}] for {limit}")
