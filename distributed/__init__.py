"""Distributed serving: process groups over `torch.distributed` that run beside the engine as its hooks (Star
Attention's ranks: `star_group.py`, the worker loop `star_worker.py`, and `star_launch.py`, the server extension
that starts them)."""
