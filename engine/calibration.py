"""Offline calibration: one dense pass of the model over text, each layer's post-RoPE q/k handed to a backend's
calibrator, and the artifact it returns stored as safetensors with JSON metadata in the header.

An artifact is named by backend, model fingerprint and the params that shape it, so the cache never hands
one model's (or one setting's) artifact to another; a file given explicitly is checked against the same
three and refused with the command that makes the right one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shlex
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from attention_backends.base import AttentionBackend, NoParams
from attention_backends.calibrated import CalibratedBackend, CalibratedParams
from attention_backends.hf_attention import capture_qk
from engine.model_loader import LoadedModel, cache_dir
from engine.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from kv_cache.paged_kv import PagedKVCache

logger = logging.getLogger(__name__)

CALIBRATION_TEXT = Path(__file__).with_name("data") / "calibration.txt"
DEFAULT_MAX_TOKENS = 4096
META_KEY = "longserve"


class CalibrationError(ValueError):
    """A missing or mismatched artifact; the message says how to make the right one."""


def artifact_path(backend: str, fingerprint: str, params: CalibratedParams) -> Path:
    shaping = json.dumps(params.calibration_params(), sort_keys=True)
    digest = hashlib.sha256(shaping.encode()).hexdigest()[:12]
    return cache_dir() / "calibration" / f"{backend}-{fingerprint}-{digest}.safetensors"


def calibrate_command(backend: str, model: str | None, params: CalibratedParams, output: str | None) -> str:
    cmd = ["longserve", "calibrate", "--backend", backend]
    if model:
        cmd += ["--model", model]
    if params.calibration_params():
        cmd += ["--attention-params", json.dumps(params.calibration_params(), sort_keys=True)]
    if output:
        cmd += ["--output", output]
    return shlex.join(cmd)


def run_calibration(loaded: LoadedModel, impl: AttentionBackend, params: CalibratedParams, text: str,
                    max_tokens: int = DEFAULT_MAX_TOKENS, progress: bool = True) -> dict[str, torch.Tensor]:
    """One dense prefill of `text` (at most `max_tokens` tokens) over a scratch cache, feeding the calibrator."""
    if not isinstance(impl, CalibratedBackend):
        raise CalibrationError(f"backend {impl.name!r} needs no calibration")
    ids = loaded.tokenizer.encode(text)[:max_tokens]
    if len(ids) < 2 * impl.spec.block_size:
        raise CalibrationError(f"the calibration text has {len(ids)} tokens; it needs at least a few hundred")
    calibrator = impl.calibrator(params)
    blocks = math.ceil(len(ids) / impl.spec.block_size)
    scratch = PagedKVCache(impl.kv.spec, blocks + 1, impl.kv.device)
    runner = ModelRunner(loaded.model, scratch, impl.spec)
    seq = Sequence("calibration", ids, SamplingParams(max_tokens=1), "dense", NoParams(), len(ids) + 1)
    with tqdm(total=impl.spec.num_layers, desc=f"calibrating {impl.name} on {len(ids)} tokens", unit="layer",
              disable=not progress) as bar:
        def observe(layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
            calibrator.observe(layer, q.float(), k.float())
            bar.update()

        with capture_qk(observe):
            runner.run([(seq, len(ids))], {"calibration": list(range(1, blocks + 1))})
    return calibrator.result()


def save_artifact(path: Path, tensors: dict[str, torch.Tensor], backend: str, fingerprint: str,
                  params: CalibratedParams, text: str, max_tokens: int) -> None:
    meta = {"backend": backend, "model_fingerprint": fingerprint, "params": params.calibration_params(),
            "data_sha256": hashlib.sha256(text.encode()).hexdigest(), "max_tokens": max_tokens,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp, metadata={META_KEY: json.dumps(meta)})
    tmp.replace(path)  # never a half-written artifact under the real name


def load_artifact(path: Path, backend: str, fingerprint: str, params: CalibratedParams, model: str | None
                  ) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    want = {"backend": backend, "model_fingerprint": fingerprint, "params": params.calibration_params()}
    wrong = [f"{k} {meta.get(k)!r} (this server needs {v!r})" for k, v in want.items() if meta.get(k) != v]
    if wrong:
        cmd = calibrate_command(backend, model, params, str(path) if params.calibration else None)
        raise CalibrationError(f"calibration artifact {path} was made for another setting: {'; '.join(wrong)}. "
                               f"Make the right one with: {cmd}")
    return tensors


def obtain(loaded: LoadedModel, impl: AttentionBackend, params: CalibratedParams, model: str | None,
           calibrate: bool = True) -> dict[str, torch.Tensor] | None:
    """The artifact `params` need: loaded from its file, else (the cache's own, `calibrate` set) made now on the
    bundled text. None when it is missing and `calibrate` is off."""
    path = Path(params.calibration) if params.calibration else artifact_path(impl.name, loaded.fingerprint, params)
    if path.exists():
        return load_artifact(path, impl.name, loaded.fingerprint, params, model)
    if params.calibration:
        raise CalibrationError(f"calibration artifact {path} does not exist. Make it with: "
                               f"{calibrate_command(impl.name, model, params, str(path))}")
    if not calibrate:
        logger.info("no %s calibration for this model in %s yet: it is made on first use", impl.name, path.parent)
        return None
    logger.warning("no %s calibration for this model yet: calibrating on the bundled text %s (once; the artifact "
                   "goes to %s)", impl.name, CALIBRATION_TEXT, path)
    text = CALIBRATION_TEXT.read_text()
    tensors = run_calibration(loaded, impl, params, text, progress=False)
    save_artifact(path, tensors, impl.name, loaded.fingerprint, params, text, DEFAULT_MAX_TOKENS)
    return tensors
