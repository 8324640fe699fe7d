"""The plugin inside vLLM, without a model: found through its entry point, registered once per process, selected by
vLLM's own flag (the CPU platform included), and its math over a cache vLLM's writer filled equal to stock CPU_ATTN
(dense, a model's sliding window) and to the masked reference (SWAA's sinks and window). Runs in the vLLM venv."""

from __future__ import annotations

import pickle
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

pytest.importorskip("vllm", reason="the plugin's tests run in the vLLM venv (make test makes it)")

import torch  # noqa: E402
from backend_harness import masked_attention  # noqa: E402
from vllm import _custom_ops as ops  # noqa: E402
from vllm.config import AttentionConfig  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.platforms.cpu import CpuPlatform  # noqa: E402
from vllm.plugins import load_general_plugins  # noqa: E402
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402
from vllm.v1.attention.backends.registry import AttentionBackendEnum  # noqa: E402
from vllm.v1.attention.selector import AttentionSelectorConfig  # noqa: E402

import longserve_vllm  # noqa: E402
from attention_backends.kernels.ranges import RangeRow, attend_ranges, range_work  # noqa: E402
from longserve_vllm.layout import cache_views  # noqa: E402
from longserve_vllm.metadata import step_rows  # noqa: E402

NAMES = ("LONGSERVE_DENSE", "LONGSERVE_SWAA", "LONGSERVE_LOKI")


def test_entry_point_registers_each_backend_once():
    (ep,) = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "longserve"]
    assert ep.value == "longserve_vllm:register"
    load_general_plugins()
    members = dict(AttentionBackendEnum.__members__)
    takeover = CpuPlatform.get_attn_backend_cls
    longserve_vllm.register()  # a second call changes nothing
    assert dict(AttentionBackendEnum.__members__) == members
    assert CpuPlatform.get_attn_backend_cls == takeover
    for name in NAMES:
        cls = AttentionBackendEnum[name].get_class()
        assert cls.get_name() == name and cls.__module__.startswith("longserve_vllm.")


def test_attention_backend_flag_parses_and_the_cpu_platform_honours_it():
    load_general_plugins()
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--attention-backend", "LONGSERVE_SWAA", "--additional-config",
                              '{"longserve": {"window": 1024, "sinks": 64}}'])
    assert args.additional_config == {"longserve": {"window": 1024, "sinks": 64}}
    assert AttentionConfig(backend=args.attention_backend).backend is AttentionBackendEnum.LONGSERVE_SWAA
    selector = AttentionSelectorConfig(head_size=64, dtype=torch.float32, kv_cache_dtype="auto", block_size=32)
    assert (CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.LONGSERVE_SWAA, selector)
            == "longserve_vllm.swaa.SWAABackend")
    stock = AttentionBackendEnum.CPU_ATTN.get_path()
    assert CpuPlatform.get_attn_backend_cls(None, selector) == stock
    assert CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.FLASH_ATTN, selector) == stock


HQ, HKV, D, BS, NB = 4, 2, 64, 32, 24
SCALE = D**-0.5
# (cached tokens, new tokens) per request: a prefill from scratch, a chunk after cached context, two decodes.
REQUESTS = [(0, 70), (30, 40), (99, 1), (250, 1)]


def vllm_written_cache():
    """A layer's page filled by vLLM's own CPU writer (the `vec` packing), the raw K/V per request, the step's
    queries and vLLM-shaped metadata."""
    g = torch.Generator().manual_seed(0)
    kv_cache = torch.zeros(NB, HKV, BS, 2 * D)
    key_cache, value_cache = kv_cache.view(NB, HKV, 2 * BS, D).chunk(2, dim=2)
    free = (torch.randperm(NB - 1, generator=g) + 1).tolist()
    tables = torch.zeros(len(REQUESTS), 10, dtype=torch.int32)
    raw = []
    for i, (cached, new) in enumerate(REQUESTS):
        n = cached + new
        blocks = [free.pop() for _ in range(-(-n // BS))]
        tables[i, : len(blocks)] = torch.tensor(blocks)
        k, v = torch.randn(n, HKV, D, generator=g), torch.randn(n, HKV, D, generator=g)
        pos = torch.arange(n)
        slots = tables[i].long()[pos // BS] * BS + pos % BS
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, "vec", k_scale=1.0, v_scale=1.0,
                                       kv_cache_dtype="auto")
        raw.append((k.transpose(0, 1), v.transpose(0, 1)))
    query_start_loc = torch.tensor([0] + [new for _, new in REQUESTS]).cumsum(0).int()
    seq_lens = torch.tensor([c + n for c, n in REQUESTS], dtype=torch.int32)
    q = torch.randn(int(query_start_loc[-1]), HQ, D, generator=g)
    return kv_cache, key_cache, value_cache, raw, tables, query_start_loc, seq_lens, q


def longserve_attention(kv_cache, tables, query_start_loc, seq_lens, q, sinks=0, window=None):
    kc, vc = cache_views(kv_cache, D, "vec")
    rows = [RangeRow(r.row, r.block_table.long(), r.start, r.length, sinks, window)
            for r in step_rows(query_start_loc, seq_lens, tables, BS, len(REQUESTS))]
    work = range_work(rows, block_size=BS, group=HQ // HKV, dtype=torch.float32, device="cpu", num_blocks=NB)
    out = torch.empty(HQ, q.shape[0], D)
    attend_ranges(out, q.transpose(0, 1), None, None, kc, vc, work, SCALE)
    return out.transpose(0, 1)


@pytest.mark.parametrize("window", [None, 48])
def test_kernel_on_a_vllm_written_cache_equals_stock_cpu_attn(window):
    kv_cache, key_cache, value_cache, _, tables, loc, lens, q = vllm_written_cache()
    meta = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(REQUESTS), num_heads=HQ, num_kv_heads=HKV, head_dim=D, seq_lens=lens, dtype=torch.float32,
        query_start_loc=loc, causal=True, sliding_window_size=window or -1, isa="vec", enable_kv_split=False)
    stock = torch.empty_like(q)
    ops.cpu_attention_with_kv_cache(
        query=q, key_cache=key_cache, value_cache=value_cache, output=stock, query_start_loc=loc, seq_lens=lens,
        scale=SCALE, causal=True, alibi_slopes=None, sliding_window=window or -1, block_table=tables, softcap=0.0,
        scheduler_metadata=meta, s_aux=None)
    got = longserve_attention(kv_cache, tables, loc, lens, q, window=window)
    torch.testing.assert_close(got, stock, atol=1e-5, rtol=1e-5)


def test_swaa_on_a_vllm_written_cache_equals_the_masked_reference():
    sinks, window = 5, 40
    kv_cache, _, _, raw, tables, loc, lens, q = vllm_written_cache()
    got = longserve_attention(kv_cache, tables, loc, lens, q, sinks=sinks, window=window)
    for i, ((cached, new), (k, v)) in enumerate(zip(REQUESTS, raw)):
        qpos, kpos = torch.arange(cached, cached + new)[:, None], torch.arange(cached + new)
        visible = (kpos <= qpos) & ((kpos < sinks) | (qpos - kpos < window))
        rows = slice(int(loc[i]), int(loc[i + 1]))
        want = masked_attention(q[rows].transpose(0, 1), k, v, visible, SCALE).transpose(0, 1)
        torch.testing.assert_close(got[rows], want, atol=1e-5, rtol=1e-5)


def test_a_process_vllm_spawns_unpickles_a_longserve_backend_before_loading_plugins():
    # vLLM's CPU platform spawns its engine core, which unpickles the config (and its backend) first.
    load_general_plugins()
    config = pickle.dumps(AttentionConfig(backend="LONGSERVE_SWAA"))
    read = "import pickle, sys; print(pickle.load(sys.stdin.buffer).backend.name)"
    child = subprocess.run([sys.executable, "-c", read], input=config, capture_output=True, check=True)
    assert child.stdout.decode().split()[-1] == "LONGSERVE_SWAA"
