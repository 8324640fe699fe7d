"""LONGSERVE_DENSE: exact attention through longserve's kernel layer over vLLM's cache; the parity baseline that
shows the layout and metadata translation give stock vLLM's tokens."""

from __future__ import annotations

from longserve_vllm.backend import LongserveBackend, RangeImpl


class DenseImpl(RangeImpl):
    method = "dense"


class DenseBackend(LongserveBackend):
    registered_name = "LONGSERVE_DENSE"
    impl_cls = DenseImpl
