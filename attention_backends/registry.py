"""Backends by name: the built-in ones plus those of the entry-point group `longserve.attention_backends`."""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points
from typing import Any

from pydantic import BaseModel, ValidationError

from attention_backends.base import AttentionBackend

ENTRY_POINT_GROUP = "longserve.attention_backends"
# Imported on first lookup, so that importing the kernel layer (or the contract) imports no backend.
BUILTIN = {
    "dense": "attention_backends.dense:DenseBackend",
    "sliding_window": "attention_backends.sliding_window:SlidingWindowBackend",
    "infllm_v2": "attention_backends.infllm_v2:InfLLMV2Backend",
    "loki": "attention_backends.loki:LokiBackend",
    "tca": "attention_backends.tca:TCABackend",
    "star": "attention_backends.star:StarBackend",
}
logger = logging.getLogger(__name__)

_REGISTRY: dict[str, type[AttentionBackend]] = {}
_entry_points_loaded = False


class BackendError(ValueError):
    """An unknown backend name or invalid backend params; the message is meant for the user."""


def register_backend(cls: type[AttentionBackend]) -> type[AttentionBackend]:
    """Class decorator; a third-party package's entry point may call it too."""
    builtin = BUILTIN.get(cls.name)
    if builtin is not None and builtin != f"{cls.__module__}:{cls.__qualname__}":
        raise ValueError(f"attention backend {cls.name!r} is already registered by {builtin.split(':')[0]}")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"attention backend {cls.name!r} is already registered by {existing.__module__}")
    _REGISTRY[cls.name] = cls
    return cls


def _builtin(name: str) -> type[AttentionBackend] | None:
    if name not in BUILTIN:
        return None
    module, cls_name = BUILTIN[name].split(":")
    cls = getattr(importlib.import_module(module), cls_name)
    _REGISTRY[name] = cls
    return cls


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception:  # a broken plugin must not take the built-in backends down with it
            logger.exception("could not load attention backend entry point %s", ep.value)
            continue
        if isinstance(obj, type) and issubclass(obj, AttentionBackend):
            register_backend(obj)
        elif callable(obj):
            obj()  # a register() function


def available_backends() -> list[str]:
    _load_entry_points()
    return sorted(set(_REGISTRY) | set(BUILTIN))


def get_backend_class(name: str) -> type[AttentionBackend]:
    _load_entry_points()
    cls = _REGISTRY.get(name) or _builtin(name)
    if cls is None:
        raise BackendError(f"unknown attention backend {name!r}; registered: {', '.join(available_backends())}")
    return cls


def validate_params(name: str, params: dict[str, Any] | BaseModel | None) -> BaseModel:
    cls = get_backend_class(name)
    if isinstance(params, cls.Params):
        return params
    try:
        return cls.Params.model_validate(params or {})
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'params'}: {err['msg']}" for err in e.errors())
        raise BackendError(f"invalid attention_params for backend {name!r}: {problems}") from None
