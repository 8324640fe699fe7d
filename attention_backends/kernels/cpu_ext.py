"""longserve's C++ CPU kernels (`csrc/`), compiled from source with the machine's compiler on first use.

`make install` builds them (`python -m attention_backends.kernels.cpu_ext`), so a server's first request does
not wait for the compiler; torch's extension loader rebuilds when a source changes and otherwise loads the built
library (a lock keeps concurrent processes from building twice). They are built for the machine's own instruction
set (`-march=native`): a build is named after the machine's CPU, so that a cache shared by machines of different
CPUs (a home directory on a cluster's file server) never loads one machine's build on another.
`LONGSERVE_CPU_FLAGS` adds compiler flags, and a build of its own: `-mno-avx512f` or `-mno-avx` build the AVX2 or
SSE forms on an AVX-512 machine (the tests check them so).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = tuple(sorted(CSRC.glob("*.cpp")))
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"]


def _digest() -> str:
    # torch's loader rebuilds when a listed source changes, not a header: every file of csrc/ goes into the flags.
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(CSRC.iterdir()))).hexdigest()[:16]


def _extra_flags() -> list[str]:
    return os.environ.get("LONGSERVE_CPU_FLAGS", "").split()


def _cpu() -> str:
    """What `-march=native` compiles for: the CPU's model and feature flags (Linux), else the platform's name."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keys = ("model name", "flags", "CPU part", "Features")  # x86's, then Arm's
    return "\n".join(next((ln for ln in lines if ln.startswith(key)), "") for key in keys)


def _name(flags: tuple[str, ...]) -> str:
    # One build per environment: an extension is tied to the torch it was compiled against, and torch's loader
    # would rebuild one shared by two venvs at every switch (their include paths differ). One per CPU and extra
    # flags too: torch's loader rebuilds on changed flags, not on another machine, which would load a build that
    # uses instructions it lacks.
    key = "\0".join([sys.prefix, _cpu(), *flags])
    return ("longserve_cpu_" + "".join(c if c.isalnum() else "_" for c in torch.__version__) + "_"
            + hashlib.sha256(key.encode()).hexdigest()[:8])


@cache
def load() -> ModuleType:
    """The kernels as this process runs them: built with `LONGSERVE_CPU_FLAGS` added."""
    return build(tuple(_extra_flags()))


@cache
def build(flags: tuple[str, ...] = ()) -> ModuleType:
    """The kernels built with `flags` added to the compiler's (a build of its own): a benchmark compares two builds in
    one process so."""
    from torch.utils.cpp_extension import load as load_extension

    return load_extension(_name(flags), [str(s) for s in SOURCES],
                          extra_cflags=[*FLAGS, *flags, f"-DLONGSERVE_CSRC={_digest()}"],
                          extra_ldflags=["-fopenmp"], verbose=bool(os.environ.get("LONGSERVE_VERBOSE_BUILD")))


@cache
def available() -> bool:
    """Whether the kernels load (building them if needed); a machine without a compiler runs the reference ops."""
    try:
        load()
    except Exception as exc:  # noqa: BLE001  (any build failure means: use the reference ops)
        log.warning("longserve's CPU kernels did not build (%s); the PyTorch reference ops run instead", exc)
        return False
    return True


if __name__ == "__main__":
    print(load().__file__)
