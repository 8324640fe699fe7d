"""Attention kernels: PyTorch reference ops (and, where a backend needs one, Triton versions tested against them)."""
