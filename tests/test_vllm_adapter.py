"""The vLLM plugin's adapters, without vLLM: its cache layouts as the kernel layer's views, its step metadata as
longserve rows, and a deployment's params through longserve's schemas."""

from __future__ import annotations

import pytest
import torch

from longserve_vllm.config import LongserveConfigError, deployment_params
from longserve_vllm.layout import cache_views
from longserve_vllm.metadata import step_rows

NB, H, BS, D = 3, 2, 32, 8


def packed_cell(k: torch.Tensor, v: torch.Tensor, keys_transposed: bool) -> torch.Tensor:
    """A vLLM page `[NB, H, BS, 2D]` built element by element from logical K/V `[NB, BS, H, D]`: on the CPU each
    (block, head) holds its keys, `[D, BS]` when transposed, then its values `[BS, D]`; on CUDA each cell is K | V."""
    if not keys_transposed:
        return torch.cat([k, v], dim=-1).transpose(1, 2).contiguous()
    raw = torch.empty(NB, H, 2 * BS * D)
    for b in range(NB):
        for h in range(H):
            for t in range(BS):
                for d in range(D):
                    raw[b, h, d * BS + t] = k[b, t, h, d]
                    raw[b, h, BS * D + t * D + d] = v[b, t, h, d]
    return raw.view(NB, H, BS, 2 * D)


@pytest.mark.parametrize("isa", [None, "vec", "vec16"])
def test_cache_views_read_the_page_as_vllm_packs_it(isa):
    k, v = torch.randn(NB, BS, H, D), torch.randn(NB, BS, H, D)
    cells = packed_cell(k, v, keys_transposed=isa is not None)
    kc, vc = cache_views(cells, D, isa)
    assert kc.shape == vc.shape == (NB, BS, H, D)
    assert torch.equal(kc, k) and torch.equal(vc, v)
    kc[1, 5, 0] = 7.0  # views, not copies: a write lands in the page
    assert torch.equal(cache_views(cells, D, isa)[0][1, 5, 0], torch.full((D,), 7.0))


def test_an_isa_without_a_strided_packing_is_refused():
    with pytest.raises(ValueError, match="'amx'.*--dtype float32"):
        cache_views(torch.zeros(NB, H, BS, 2 * D), D, "amx")


def test_step_rows_from_vllms_tensors():
    tables = torch.arange(12).view(3, 4)
    # A 5-token prefill from scratch, a decode at length 40, a padding row.
    loc, lens = torch.tensor([0, 5, 6, 6]), torch.tensor([5, 40, 0])
    rows = step_rows(loc, lens, tables, BS, num_reqs=3)
    assert [(r.row, r.start, r.length, r.prefilling) for r in rows] == [(0, 0, 5, True), (5, 39, 1, False)]
    assert rows[0].block_table.tolist() == [0] and rows[1].block_table.tolist() == [4, 5]
    # vLLM's own flag wins: a one-token chunk of a prompt is still a prefill.
    rows = step_rows(loc, lens, tables, BS, num_reqs=3, is_prefilling=torch.tensor([True, True, False]))
    assert [r.prefilling for r in rows] == [True, True]


def test_deployment_params_are_longserves_schema():
    params = deployment_params("sliding_window", {"longserve": {"window": 1024, "sinks": 64,
                                                                "full_attention_layers": "odd"}})
    assert (params.window, params.sinks, params.prefill_only) == (1024, 64, True)
    assert params.full_layers(4) == {1, 3}
    assert deployment_params("dense", None).model_dump() == {}
    for config, says in [({"longserve": {"window": 0}}, "window: Input should be greater than or equal to 1"),
                         ({"longserve": {"windw": 8}}, "windw: Extra inputs are not permitted"),
                         ({"longserve": {"release_kv": True}}, "release_kv needs windowed decode"),
                         ({"longserve": [1]}, 'must be an object')]:
        with pytest.raises(LongserveConfigError, match=says):
            deployment_params("sliding_window", config)
    with pytest.raises(LongserveConfigError, match="Extra inputs"):
        deployment_params("dense", {"longserve": {"window": 8}})
