"""Engine settings, named as vLLM's engine arguments."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class EngineConfig:
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    block_size: int = 16
    kv_cache_memory: float = 4.0  # GiB of K/V, used when num_kv_blocks is not given
    num_kv_blocks: int | None = None
    max_num_batched_tokens: int = 4096
    max_num_seqs: int = 64
    # Cap on one prefill's chunk while other prefills wait, so a long prompt cannot hold back short ones; 0 (vLLM's
    # default): none, first come first served.
    long_prefill_token_threshold: int = 0
    enable_prefix_caching: bool = True
    attention_backend: str = "dense"
    attention_params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: str = "auto"  # "auto": CUDA where a GPU is found, else the CPU
    dtype: str = "auto"  # "auto": float32 on CPU, the checkpoint's half precision (or bfloat16) on GPU
    # A float32 model on the CPU: a second copy of each linear weight in oneDNN's blocked layout, which prefill chunks
    # multiply 5-15% faster by, for the linear weights' size again in memory. Read when the engine loads the model.
    cpu_prepacked_weights: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be positive")
        if self.num_kv_blocks is None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be >= 0, got {self.long_prefill_token_threshold}")
