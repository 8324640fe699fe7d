"""Offline calibration: what backends that learn from the model share (Loki's PCA bases, TCA's head budgets).

One dense pass of the model over text hands each layer's post-RoPE q/k to the backend's calibrator, and the
artifact it returns is stored as safetensors with JSON metadata in the header. An artifact is named by
backend, model fingerprint and the params that shape it, so the cache never hands one model's (or one
setting's) artifact to another; a file given explicitly is checked against the same three and refused with the
command that makes the right one. `longserve calibrate` and a first use that finds no artifact both run
`calibrate`; the engine supplies the model pass (`CalibrationModel`), so this room never imports it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from attention_backends.base import AttentionBackend
from attention_backends.context import MetaT
from attention_backends.hf_attention import capture_qk

logger = logging.getLogger(__name__)

CALIBRATION_TEXT = Path(__file__).with_name("data") / "calibration.txt"
DEFAULT_MAX_TOKENS = 4096
META_KEY = "longserve"


class CalibrationError(ValueError):
    """A missing or mismatched artifact; the message says how to make the right one."""


class CalibratedParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # The params that change what calibration learns; the others may differ per request over one artifact.
    shaping: ClassVar[tuple[str, ...]] = ()
    # Whether what calibration learns depends on the KV cache's block size: its artifacts are then kept per size.
    per_block_size: ClassVar[bool] = False

    calibration: str | None = Field(
        None, description="artifact path; default: the cache's artifact for this model, made on first use")

    def calibration_params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.shaping}


class Calibrator(Protocol):
    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        """One layer's post-RoPE queries `[H_q, T, D]` and keys `[H_kv, T, D]` over the calibration text."""

    def result(self) -> dict[str, torch.Tensor]: ...


class CalibratedBackend(AttentionBackend[MetaT]):
    """A backend that needs an artifact from offline calibration; each request's params name theirs."""

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

    def has_artifact(self, params: CalibratedParams) -> bool:
        return self.artifact_key(params) in self.artifacts

    def load_calibration(self, params: CalibratedParams, tensors: dict[str, torch.Tensor]) -> None:
        self.artifacts[self.artifact_key(params)] = self.from_tensors(tensors)

    def artifact(self, params: CalibratedParams) -> Any:
        return self.artifacts[self.artifact_key(params)]


@dataclass(frozen=True, slots=True)
class CalibrationModel:
    """What calibration needs of the served model."""

    name: str | None  # as the user gave it (`--model`), for the commands in messages
    fingerprint: str  # identifies the weights
    encode: Callable[[str], list[int]]
    dense_pass: Callable[[list[int]], None]  # one dense prefill of these tokens, every layer through longserve


def fingerprint(model_dir: Path) -> str:
    """Identifies a model directory's weights cheaply: config, and size and mtime of every weight file."""
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    """longserve's cache (converted models, calibration artifacts): `LONGSERVE_CACHE`, else ~/.cache/longserve."""
    return Path(os.environ.get("LONGSERVE_CACHE", Path.home() / ".cache" / "longserve"))


def artifact_path(backend: str, fingerprint: str, params: CalibratedParams, block_size: int) -> Path:
    """Where longserve's cache keeps the artifact for these weights, params and (where it matters) block size: a
    server with 16-token blocks and vLLM with 32-token pages each find their own."""
    shaping = json.dumps(params.calibration_params(), sort_keys=True)
    digest = hashlib.sha256(shaping.encode()).hexdigest()[:12]
    blocks = f"-block{block_size}" if params.per_block_size else ""
    return cache_dir() / "calibration" / f"{backend}-{fingerprint}-{digest}{blocks}.safetensors"


def calibrate_command(backend: str, model: str | None, params: CalibratedParams, output: str | None,
                      block_size: int) -> str:
    cmd = ["longserve", "calibrate", "--backend", backend]
    if model:
        cmd += ["--model", model]
    if params.per_block_size:
        cmd += ["--block-size", str(block_size)]
    if params.calibration_params():
        cmd += ["--attention-params", json.dumps(params.calibration_params(), sort_keys=True)]
    if output:
        cmd += ["--output", output]
    return shlex.join(cmd)


def save_artifact(path: Path, tensors: dict[str, torch.Tensor], backend: str, fingerprint: str,
                  params: CalibratedParams, text: str, max_tokens: int) -> None:
    meta = {"backend": backend, "model_fingerprint": fingerprint, "params": params.calibration_params(),
            "data_sha256": hashlib.sha256(text.encode()).hexdigest(), "max_tokens": max_tokens,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp, metadata={META_KEY: json.dumps(meta)})
    tmp.replace(path)  # never a half-written artifact under the real name


def load_artifact(path: Path, backend: str, fingerprint: str, params: CalibratedParams, model: str | None,
                  block_size: int) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    want = {"backend": backend, "model_fingerprint": fingerprint, "params": params.calibration_params()}
    wrong = [f"{k} {meta.get(k)!r} (this server needs {v!r})" for k, v in want.items() if meta.get(k) != v]
    if wrong:
        cmd = calibrate_command(backend, model, params, str(path) if params.calibration else None, block_size)
        raise CalibrationError(f"calibration artifact {path} was made for another setting: {'; '.join(wrong)}. "
                               f"Make the right one with: {cmd}")
    return tensors


def calibrate(model: CalibrationModel, impl: CalibratedBackend, params: CalibratedParams, text: str | None = None,
              max_tokens: int = DEFAULT_MAX_TOKENS, output: Path | None = None, progress: bool = True
              ) -> tuple[Path, dict[str, torch.Tensor]]:
    """Run the model once over `text` (default: the bundled text; at most `max_tokens` tokens), feed the backend's
    calibrator, and store the artifact at `output` (default: where the cache looks for it)."""
    text = CALIBRATION_TEXT.read_text() if text is None else text
    ids = model.encode(text)[:max_tokens]
    if len(ids) < 2 * impl.spec.block_size:
        raise CalibrationError(f"the calibration text has {len(ids)} tokens; it needs at least a few hundred")
    calibrator = impl.calibrator(params)
    with tqdm(total=impl.spec.num_layers, desc=f"calibrating {impl.name} on {len(ids)} tokens", unit="layer",
              disable=not progress) as bar:
        def observe(layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
            calibrator.observe(layer, q.float(), k.float())
            bar.update()

        with capture_qk(observe):
            model.dense_pass(ids)
    tensors = calibrator.result()
    path = output or artifact_path(impl.name, model.fingerprint, params, impl.spec.block_size)
    save_artifact(path, tensors, impl.name, model.fingerprint, params, text, max_tokens)
    return path, tensors


def obtain(model: CalibrationModel, impl: CalibratedBackend, params: CalibratedParams, make: bool = True
           ) -> dict[str, torch.Tensor] | None:
    """The artifact `params` need: loaded from its file, else (the cache's own, `make` set) made now on the bundled
    text. None when it is missing and `make` is off."""
    bs = impl.spec.block_size
    path = Path(params.calibration) if params.calibration else artifact_path(impl.name, model.fingerprint, params, bs)
    if path.exists():
        return load_artifact(path, impl.name, model.fingerprint, params, model.name, bs)
    if params.calibration:
        raise CalibrationError(f"calibration artifact {path} does not exist. Make it with: "
                               f"{calibrate_command(impl.name, model.name, params, str(path), bs)}")
    if not make:
        logger.info("no %s calibration for this model in %s yet: it is made on first use", impl.name, path.parent)
        return None
    logger.warning("no %s calibration for this model yet: calibrating on the bundled text %s (once; the artifact "
                   "goes to %s)", impl.name, CALIBRATION_TEXT, path)
    return calibrate(model, impl, params, progress=False)[1]
