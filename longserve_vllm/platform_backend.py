"""The platform's own vLLM attention classes, which longserve's backends extend: they keep vLLM's KV-cache
writer (`do_kv_cache_update`), cache layout and capability checks, and replace the attention math."""

from __future__ import annotations

from vllm.platforms import current_platform

if current_platform.is_cpu():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend as PlatformBackend
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl as PlatformImpl
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa as cpu_attention_isa
elif current_platform.is_cuda():
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend as PlatformBackend
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl as PlatformImpl

    cpu_attention_isa = None
else:
    raise ImportError(f"longserve's vLLM backends run on CPU and CUDA, not on {current_platform.device_name}")

ON_CPU = current_platform.is_cpu()

__all__ = ["ON_CPU", "PlatformBackend", "PlatformImpl", "cpu_attention_isa"]
