"""Attention backends: the contract (`base.py`, `context.py`), the registry, the built-in backends, calibration,
and the kernel layer (`kernels/`). Importing the package imports none of them, so the kernel layer can be used on
its own (the vLLM plugin does); the registry imports the built-in backends on first use."""
