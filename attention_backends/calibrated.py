"""What backends with offline calibration share: the `calibration` param, and the artifacts they hold.

The engine finds or makes an artifact (`engine/calibration.py`) and hands its tensors to the backend once;
each request's params name the artifact they need through `artifact_key`.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field


class CalibratedParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # The params that change what calibration learns; the others may differ per request over one artifact.
    shaping: ClassVar[tuple[str, ...]] = ()

    calibration: str | None = Field(
        None, description="artifact path; default: the cache's artifact for this model, made on first use")

    def calibration_params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.shaping}


class Calibrator(Protocol):
    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        """One layer's post-RoPE queries `[H_q, T, D]` and keys `[H_kv, T, D]` over the calibration text."""

    def result(self) -> dict[str, torch.Tensor]: ...


class CalibratedBackend:
    """Mixin, listed before the `AttentionBackend` base, for a backend with `capabilities.needs_calibration`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.artifacts: dict[str, Any] = {}

    def calibrator(self, params: CalibratedParams) -> Calibrator:
        raise NotImplementedError

    def from_tensors(self, tensors: dict[str, torch.Tensor]) -> Any:
        """The backend's in-memory form of an artifact."""
        raise NotImplementedError

    @staticmethod
    def artifact_key(params: CalibratedParams) -> str:
        return params.calibration or json.dumps(params.calibration_params(), sort_keys=True)

    def load_calibration(self, params: CalibratedParams, tensors: dict[str, torch.Tensor]) -> None:
        self.artifacts[self.artifact_key(params)] = self.from_tensors(tensors)

    def artifact(self, params: CalibratedParams) -> Any:
        return self.artifacts[self.artifact_key(params)]
