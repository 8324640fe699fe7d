"""Which implementation a kernel-layer op runs: the Triton kernel for tensors on CUDA; on the CPU, longserve's C++
kernel where the op has one (`cpu_ext.py`, built from `csrc/` with the machine's compiler), else the PyTorch
reference op. `LONGSERVE_KERNELS=torch|triton|cpp` forces one; the tests force Triton on the CPU under the
interpreter (`TRITON_INTERPRET=1`, set in tests/conftest.py before any kernel is defined). Plans are built for one
implementation in `prepare`, so a step never mixes them.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache

import torch

MODES = ("auto", "torch", "triton", "cpp")


@cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _mode() -> str:
    mode = os.environ.get("LONGSERVE_KERNELS", "auto")
    if mode not in MODES:
        raise ValueError(f"LONGSERVE_KERNELS must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def use_triton(device: torch.device | str) -> bool:
    mode = _mode()
    if mode == "triton":
        if not _triton_installed():
            raise RuntimeError("LONGSERVE_KERNELS=triton, but triton is not installed")
        return True
    return mode == "auto" and torch.device(device).type == "cuda" and _triton_installed()


def use_cpp(device: torch.device | str) -> bool:
    """For an op with a C++ CPU kernel: whether it runs (auto: on CPU tensors, when the kernels build here)."""
    from attention_backends.kernels import cpu_ext

    mode = _mode()
    if mode == "cpp":
        cpu_ext.load()  # forced: a build failure is the error
        return True
    return mode == "auto" and torch.device(device).type == "cpu" and cpu_ext.available()


def check_ids(ids: torch.Tensor, limit: int, what: str) -> None:
    """Refuse ids outside `[0, limit)` before a launch: an out-of-range load is no error on a GPU, and kills the
    process under the interpreter. Run on the host copy, which plans keep, so it costs no device sync."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= limit):
        raise IndexError(f"{what} out of range: [{int(ids.min())}, {int(ids.max())}] for {limit}")
