"""longserve's attention methods as vLLM attention backends: the `vllm.general_plugins` entry point.

vLLM calls `register()` once in each of its processes (API server, engine core, workers). It adds each backend to
vLLM's `AttentionBackendEnum` by name, so `vllm serve MODEL --attention-backend LONGSERVE_SWAA --additional-config
'{"longserve": {...}}'` selects one; registers the KV-cache spec whose manager frees SWAA's gap blocks; and, since
vLLM's CPU platform runs CPU_ATTN whatever backend is selected, makes it run a selected longserve backend instead.
Backend modules are named by path and imported only when vLLM picks one.
"""

from __future__ import annotations

import functools
import logging

BACKENDS = {
    "LONGSERVE_DENSE": "longserve_vllm.dense.DenseBackend",
    "LONGSERVE_SWAA": "longserve_vllm.swaa.SWAABackend",
    "LONGSERVE_LOKI": "longserve_vllm.loki.LokiBackend",
    "LONGSERVE_INFLLM_V2": "longserve_vllm.infllm_v2.InfLLMV2Backend",
    "LONGSERVE_STAR": "longserve_vllm.star.StarBackend",
    "LONGSERVE_TCA": "longserve_vllm.tca.TCABackend",
}
logger = logging.getLogger("vllm.longserve")  # under vLLM's logger, so its handlers print it


def register() -> None:
    """Idempotent: a second call in a process changes nothing."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    for name, path in BACKENDS.items():
        if name not in AttentionBackendEnum.__members__:
            register_backend(name, path)
            # A process vLLM spawns (the CPU platform always does) unpickles its config before it loads plugins, and
            # an enum member is pickled by value: pickle ours as a call that registers it first.
            AttentionBackendEnum[name].__reduce_ex__ = functools.partial(_pickled_member, name)
    _register_kv_cache_spec()
    _take_over_cpu_attention()


def _pickled_member(name: str, protocol: int) -> tuple:
    return backend_member, (name,)


def backend_member(name: str):
    """vLLM's enum member for longserve backend `name`, registering the plugin first if needed."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    register()
    return AttentionBackendEnum[name]


def _register_kv_cache_spec() -> None:
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from longserve_vllm.kv_spec import SinkWindowManager, SinkWindowSpec

    KVCacheSpecRegistry._ensure_registered()  # the built-ins register only into an empty registry
    KVCacheSpecRegistry.register(SinkWindowSpec, SinkWindowManager, uniform_type_base_spec=FullAttentionSpec)


def _take_over_cpu_attention() -> None:
    from vllm.platforms.cpu import CpuPlatform

    stock = CpuPlatform.get_attn_backend_cls
    if getattr(stock, "longserve", False):
        return

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:
        if (selected_backend is not None and selected_backend.name in BACKENDS
                and not (attn_selector_config.use_mla or attn_selector_config.use_sparse)):
            logger.info("vLLM's CPU platform runs CPU_ATTN whatever --attention-backend says; longserve runs %s in "
                        "its place", selected_backend.name)
            return selected_backend.get_path()
        return stock(selected_backend, attn_selector_config, num_heads)

    get_attn_backend_cls.longserve = True
    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)
