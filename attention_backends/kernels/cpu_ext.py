"""longserve's C++ CPU kernels (`csrc/`), compiled from source with the machine's compiler on first use.

`make install` builds them (`python -m attention_backends.kernels.cpu_ext`), so a server's first request does
not wait for the compiler; torch's extension loader rebuilds when a source changes and otherwise loads the built
library (a lock keeps concurrent processes from building twice).
"""

from __future__ import annotations

import hashlib
import logging
import os
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


def _name() -> str:
    # One build per environment: an extension is tied to the torch it was compiled against, and torch's loader
    # would rebuild one shared by two venvs at every switch (their include paths differ).
    env = hashlib.sha256(sys.prefix.encode()).hexdigest()[:8]
    return "longserve_cpu_" + "".join(c if c.isalnum() else "_" for c in torch.__version__) + "_" + env


@cache
def load() -> ModuleType:
    from torch.utils.cpp_extension import load as load_extension

    return load_extension(_name(), [str(s) for s in SOURCES], extra_cflags=[*FLAGS, f"-DLONGSERVE_CSRC={_digest()}"],
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
