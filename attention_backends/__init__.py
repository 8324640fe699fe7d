"""Attention backends: the contract, the registry and the built-in backends."""

from attention_backends import dense, infllm_v2, loki, sliding_window, star, tca  # noqa: F401  (register the built-in backends)
from attention_backends.base import AttentionBackend, Capabilities, NoParams
from attention_backends.context import AttentionSpec, BackendBatch, Phase, SeqStep, StepContext
from attention_backends.registry import (
    BackendError,
    available_backends,
    get_backend_class,
    register_backend,
    validate_params,
)

__all__ = [
    "AttentionBackend",
    "AttentionSpec",
    "BackendBatch",
    "BackendError",
    "Capabilities",
    "NoParams",
    "Phase",
    "SeqStep",
    "StepContext",
    "available_backends",
    "get_backend_class",
    "register_backend",
    "validate_params",
]
