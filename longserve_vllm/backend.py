"""What longserve's vLLM backends share: a builder that plans a step once for every kind of layer, an impl that runs
the kernel layer's ops over vLLM's cache where it lies, and the backend class tying them to vLLM's registry.

A method subclasses `RangeImpl` with its longserve name (`method`, whose params schema validates the deployment's
`--additional-config`), how it sorts layers into kinds (`kind`) and which keys each kind's rows see (`range_rows`),
or, for more than key ranges, its own per-kind plan (`plan`) and attention over it (`attend`); and
`LongserveBackend` with its registered name.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable
from pathlib import Path
from typing import Any, ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config, get_layers_from_vllm_config
from vllm.distributed.kv_transfer import has_kv_transfer_group
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import (
    AttentionCGSupport,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from attention_backends.calibration import (
    CalibrationError,
    artifact_path,
    calibrate_command,
    fingerprint,
    load_artifact,
)
from attention_backends.kernels.huge_pages import back_with_huge_pages
from attention_backends.kernels.ranges import RangeRow, attend_ranges, range_work
from longserve_vllm import logger
from longserve_vllm.config import LongserveConfigError, deployment_params
from longserve_vllm.layout import cache_views, check_cpu_isa
from longserve_vllm.metadata import RangeMetadata, StepRow, step_rows
from longserve_vllm.platform_backend import ON_CPU, PlatformBackend, PlatformImpl, cpu_attention_isa


class RangeImpl(PlatformImpl):
    """Attention over key ranges (sink tokens and a causal band) through `attention_backends.kernels`."""

    method: ClassVar[str]  # the longserve backend whose params schema and math this is
    can_return_lse_for_decode: bool = False  # no decode context parallelism: it would merge partial outputs

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None, kv_cache_dtype: str,
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, **extra: Any) -> None:
        name = f"longserve backend {self.method!r}"
        if attn_type != AttentionType.DECODER:
            raise LongserveConfigError(f"{name} serves decoder self-attention, not {attn_type}")
        if alibi_slopes is not None or logits_soft_cap or extra.get("sinks") is not None:
            raise LongserveConfigError(f"{name} does not support ALiBi, logit soft-capping or learned attention sinks")
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, **extra)
        config = get_current_vllm_config()
        self.own_window = sliding_window  # the model's own sliding window in this layer, honoured as trained
        self.params = deployment_params(self.method, config.additional_config)
        self.num_layers = config.model_config.get_total_num_hidden_layers()
        self.check_params()
        self._layers: dict[str, tuple[int, Hashable]] = {}
        self._caches: dict[str, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}

    def check_params(self) -> None:
        """Raise LongserveConfigError for params that do not fit the model."""

    def artifact(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of longserve's calibration artifact for this deployment's params: the file `calibration`
        names, or the one `longserve calibrate` stored in longserve's cache for this model directory's weights."""
        model_dir = Path(get_current_vllm_config().model_config.model)
        if not (model_dir / "config.json").is_file():
            raise LongserveConfigError(f"{name} needs a local model directory (its artifact is keyed by the weights), "
                                       f"got {str(model_dir)!r}")
        p, weights = self.params, fingerprint(model_dir)
        page = get_current_vllm_config().cache_config.block_size
        path = Path(p.calibration) if p.calibration else artifact_path(self.method, weights, p, page)
        if not path.exists():
            raise LongserveConfigError(f"no {name} calibration artifact at {path}; make it with: "
                                       f"{calibrate_command(self.method, str(model_dir), p, p.calibration, page)}")
        try:
            return load_artifact(path, self.method, weights, p, str(model_dir), page)
        except CalibrationError as e:
            raise LongserveConfigError(str(e)) from None

    def kind(self, layer_index: int) -> Hashable:
        """What decides which keys this layer's queries see; layers of one kind share a plan."""
        return self.own_window

    def range_rows(self, kind: Hashable, rows: list[StepRow]) -> list[RangeRow]:
        """The keys each row of a layer of `kind` sees."""
        return [RangeRow(r.row, r.block_table, r.start, r.length, window=kind) for r in rows]

    def plan(self, kind: Hashable, rows: list[StepRow], geometry: dict[str, Any]) -> Any:
        """A step's plan for the layers of `kind`, made once in the builder; `geometry` is `range_work`'s keywords."""
        return range_work(self.range_rows(kind, rows), **geometry)

    def attend(self, layer_index: int, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor | None,
               v: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor, work: Any) -> None:
        """`out` `[H_q, T, D]` from queries `q` and fresh `k`/`v` `[H_kv, T, D]` (None: read from the cache)."""
        attend_ranges(out, q, k, v, k_cache, v_cache, work, self.scale)

    def cache_packing(self, layer: torch.nn.Module) -> str | None:
        """How the layer's cache is laid out (`cache_views`): as vLLM's writer packs it, unless the impl writes it."""
        return layer.isa if ON_CPU else None

    def cache(self, layer: torch.nn.Module, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's K and V views (`cache_views`), made once per cache tensor: a handful of view ops per layer and
        step otherwise."""
        held = self._caches.get(layer.layer_name)
        if held is None or held[0] is not kv_cache:
            if ON_CPU:
                _back_with_huge_pages(kv_cache)
            held = self._caches[layer.layer_name] = kv_cache, cache_views(kv_cache, self.head_size,
                                                                          self.cache_packing(layer))
        return held[1]

    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        self.cache(layer, kv_cache)  # a first sight of the cache comes before any write to it
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)

    def layer(self, layer_name: str) -> tuple[int, Hashable]:
        """The layer's index and kind, parsed from its name once."""
        if layer_name not in self._layers:
            index = extract_layer_index(layer_name)
            self._layers[layer_name] = index, self.kind(index)
        return self._layers[layer_name]

    def forward(self, layer: torch.nn.Module, query: torch.Tensor, key: torch.Tensor | None,
                value: torch.Tensor | None, kv_cache: torch.Tensor, attn_metadata: RangeMetadata | None,
                output: torch.Tensor, output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("longserve backends do not fuse output quantization")
        if attn_metadata is None:  # profiling run
            return output
        n = attn_metadata.num_actual_tokens
        q = query[:n].transpose(0, 1)
        fresh = (key[:n].transpose(0, 1), value[:n].transpose(0, 1)) if key is not None else (None, None)
        out = output.view(-1, self.num_heads, self.head_size)[:n].transpose(0, 1)  # written in place, head-major
        index, kind = self.layer(layer.layer_name)
        self.attend(index, out, q, *fresh, *self.cache(layer, kv_cache), attn_metadata.work[kind])
        return output


# The cache buffers this process has looked at (`_back_with_huge_pages`), by address, each held by the first layer's
# view only as long as the engine holds it: a later engine's buffer may take the same address.
_advised: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()


def _back_with_huge_pages(kv_cache: torch.Tensor) -> None:
    """Back vLLM's CPU cache buffer with huge pages (`huge_pages`), once per buffer, if nothing is stored in it yet:
    its first sight is the first forward's first layer, before that layer's keys are written. A KV connector, which
    may write blocks in at any time, leaves it as it is."""
    storage = kv_cache.untyped_storage()
    if _advised.get(storage.data_ptr()) is not None:
        return
    _advised[storage.data_ptr()] = kv_cache
    if has_kv_transfer_group() or torch.empty(0, dtype=torch.uint8).set_(storage).any():
        return
    if advised := back_with_huge_pages(kv_cache):
        logger.info("longserve: the KV cache's %.1f GiB are on 2 MiB pages", advised / (1 << 30))


class RangeMetadataBuilder(AttentionMetadataBuilder[RangeMetadata]):
    """Plans a step once per kind of layer in its KV-cache group."""

    # Plans are built on the host from each step's lengths, which a captured graph would freeze.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig,
                 device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)
        layers = get_layers_from_vllm_config(vllm_config, Attention, layer_names)
        impls = [(name, layer.impl) for name, layer in layers.items() if isinstance(layer.impl, RangeImpl)]
        self.by_kind = {impl.layer(name)[1]: impl for name, impl in impls}
        impl = impls[0][1]
        self.group = impl.num_heads // impl.num_kv_heads
        self.block_size = kv_cache_spec.block_size
        self.dtype = vllm_config.model_config.dtype
        if ON_CPU:  # the ISA vLLM's CPU writer packs with, which the layout must know
            isa = cpu_attention_isa(self.dtype, self.block_size, kv_cache_spec.head_size,
                                    vllm_config.cache_config.cache_dtype)
            try:
                check_cpu_isa(isa)
            except ValueError as e:
                raise LongserveConfigError(str(e)) from None
            for layer in layers.values():
                layer.isa = isa

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> RangeMetadata:
        cm = common_attn_metadata
        seq_lens = cm.seq_lens_cpu_upper_bound if cm.seq_lens_cpu_upper_bound is not None else cm.seq_lens.cpu()
        prefilling = cm.is_prefilling.cpu() if cm.is_prefilling is not None else None
        prompt_lens = cm.rswa_prefix_lens.cpu() if cm.rswa_prefix_lens is not None else None
        rows = step_rows(cm.query_start_loc_cpu, seq_lens, cm.block_table_tensor.cpu(), self.block_size, cm.num_reqs,
                         prefilling, prompt_lens)
        geometry = dict(block_size=self.block_size, group=self.group, dtype=self.dtype, device=self.device,
                        num_blocks=None)
        work = {kind: impl.plan(kind, rows, geometry) for kind, impl in self.by_kind.items()}
        return RangeMetadata(cm.num_actual_tokens, work)


class LongserveBackend(PlatformBackend):
    """The platform backend with longserve's math; a subclass names its enum member and its impl."""

    registered_name: ClassVar[str]  # the member of vLLM's AttentionBackendEnum, which `get_name` must return
    impl_cls: ClassVar[type[RangeImpl]]
    forward_includes_kv_cache_update: bool = False
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @classmethod
    def get_name(cls) -> str:
        return cls.registered_name

    @classmethod
    def get_impl_cls(cls) -> type[RangeImpl]:
        return cls.impl_cls

    @staticmethod
    def get_builder_cls() -> type[RangeMetadataBuilder]:
        return RangeMetadataBuilder

    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER
