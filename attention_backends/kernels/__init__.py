"""The kernel layer: pure functions over explicit tensors, which both hosts call (longserve's engine and the vLLM
plugin). A cache is a pair of `[num_blocks, block_size, H_kv, D]` tensors of any strides; sequences are given by
block tables, lengths and the key ranges each query sees (sink or anchor tokens, a causal band, a window) or by
slot lists. Each op here is the PyTorch reference, exact and the oracle of a Triton kernel beside it; nothing in
this package imports the engine or `kv_cache`.

- `paged.py`: reading and writing the cache, and the attention call the ops end in.
- `decode.py`: one query per row over `[0, sinks) ∪ [lo, L)`.
- `prefill.py`: a chunk of queries over sinks (or an anchor) and a causal band, optionally windowed.
- `slots.py`: each query row over its own per-head slot list.
- `topk.py`: which keys a scored row keeps, Loki's low-rank scores, and Loki's decode (score, keep, attend) as one op.
- `block_sparse.py`: InfLLM-V2's compressed keys, block selection and block-sparse prefill and decode.
- `merge.py`: attention over a shard of the keys with its log-sum-exp, and the exact merge of shards.
- `csrc/` (built by `cpu_ext.py`): C++ CPU kernels for the hot ops (paged decode and prefill, Loki's decode, cache
  writes), chosen over the reference by `dispatch.py`.
"""
