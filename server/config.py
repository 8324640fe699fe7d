"""Server settings and served-model recipes, from `configs/*.yaml` and the command line.

A config file holds the same keys as the command-line flags (underscores or dashes) plus `served_models`:
each entry is a name that `/v1/models` lists and requests pick with `model`, and the attention backend and
params that name stands for. All entries share the one base model the engine loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from attention_backends.registry import validate_params
from engine.config import EngineConfig
from server.extensions import ServerExtension


@dataclass(frozen=True)
class ServedModel:
    name: str
    attention_backend: str
    attention_params: BaseModel


@dataclass
class ServerConfig:
    engine: EngineConfig
    served_models: list[ServedModel]
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)  # empty: no authentication
    allowed_origins: list[str] = field(default_factory=list)  # empty: no CORS headers at all
    max_num_queued_tokens: int = 65536  # prompt tokens admitted but not yet prefilled
    max_n_sequences: int = 16  # choices per API request (n times the number of prompts)
    max_logprobs: int = 20
    max_request_body_bytes: int = 0  # 0: 64 bytes per token of max_model_len, at least 2 MiB
    shutdown_timeout: float = 30.0  # seconds to drain in-flight requests after SIGTERM
    extensions: list[ServerExtension] = field(default_factory=list)  # configured, run around the engine

    def __post_init__(self) -> None:
        if not self.served_models:
            raise ValueError("no served models configured")
        names = [m.name for m in self.served_models]
        if len(set(names)) != len(names):
            raise ValueError(f"served model names repeat: {names}")
        if self.max_num_queued_tokens < 1 or self.max_n_sequences < 1:
            raise ValueError("max_num_queued_tokens and max_n_sequences must be positive")

    def body_limit(self, max_model_len: int) -> int:
        return self.max_request_body_bytes or max(2 << 20, 64 * max_model_len)

    def served(self, name: str | None) -> ServedModel | None:
        """The served model a request names; no name (or an empty one) means the first."""
        if not name:
            return self.served_models[0]
        return next((m for m in self.served_models if m.name == name), None)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML file's settings, keys normalised to flag destinations (dashes become underscores)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings at the top level")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def served_models_from(entries: list[dict[str, Any]] | None, default_name: str, engine: EngineConfig
                       ) -> list[ServedModel]:
    """Recipes validated against the registered backends; without entries, one recipe of the engine's backend."""
    if not entries:
        entries = [{"name": default_name, "attention_backend": engine.attention_backend,
                    "attention_params": engine.attention_params}]
    models = []
    for entry in entries:
        unknown = set(entry) - {"name", "attention_backend", "attention_params"}
        if "name" not in entry or unknown:
            raise ValueError(f"served model entry {entry}: needs `name`, and may have only attention_backend and "
                             "attention_params")
        backend = entry.get("attention_backend", "dense")
        try:
            params = validate_params(backend, entry.get("attention_params"))
        except ValueError as e:
            raise ValueError(f"served model {entry['name']!r}: {e}") from e
        models.append(ServedModel(str(entry["name"]), backend, params))
    return models


def api_keys_from(flags: list[str] | None) -> list[str]:
    """Keys from --api-key (repeatable) and LONGSERVE_API_KEY (comma-separated), as vLLM reads VLLM_API_KEY."""
    keys = list(flags or [])
    keys += [k.strip() for k in os.environ.get("LONGSERVE_API_KEY", "").split(",") if k.strip()]
    return keys
