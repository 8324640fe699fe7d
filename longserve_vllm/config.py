"""A deployment's longserve params: `--additional-config '{"longserve": {...}}'`, validated by the same pydantic
schema longserve's own server validates a request's `attention_params` with.

vLLM binds one attention backend per deployment and passes no request fields to backends, so these params hold for
every request the deployment serves.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from attention_backends.registry import BackendError, validate_params

CONFIG_KEY = "longserve"


class LongserveConfigError(ValueError):
    """A bad longserve config: raised while vLLM starts, never mid-serving."""


def deployment_params(method: str, additional_config: dict[str, Any] | None) -> BaseModel:
    """Params of longserve backend `method` from vLLM's `additional_config`."""
    raw = (additional_config or {}).get(CONFIG_KEY) or {}
    if not isinstance(raw, dict):
        raise LongserveConfigError(f'--additional-config "{CONFIG_KEY}" must be an object, got {type(raw).__name__}')
    try:
        return validate_params(method, raw)
    except BackendError as e:
        raise LongserveConfigError(f'--additional-config "{CONFIG_KEY}": {e}') from None
