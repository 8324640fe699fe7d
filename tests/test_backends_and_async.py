"""Backend registry (entry points included), the block-release seam, and the AsyncEngine."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import threading

import pytest

import attention_backends.registry as registry
from attention_backends.context import SeqStep
from attention_backends.dense import DenseBackend
from attention_backends.registry import available_backends, register_backend
from engine.async_engine import AsyncEngine
from engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def test_entry_point_backend_is_found(tmp_path, monkeypatch, make_engine):
    (tmp_path / "ls_plugin_demo.py").write_text(textwrap.dedent("""
        from attention_backends.dense import DenseBackend

        class PluginDense(DenseBackend):
            name = "plugin_dense"
    """))
    dist = tmp_path / "ls_plugin_demo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ls-plugin-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[longserve.attention_backends]\nplugin_dense = ls_plugin_demo:PluginDense\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    assert "plugin_dense" in available_backends()
    engine = make_engine()
    a = engine.generate(["The river flows"], GREEDY)[0].token_ids
    b = engine.generate(["The river flows"], GREEDY, attention_backend="plugin_dense")[0].token_ids
    assert a == b
    sys.modules.pop("ls_plugin_demo", None)


def test_duplicate_backend_name_is_refused():
    class Other(DenseBackend):
        name = "dense"

    with pytest.raises(ValueError, match="already registered"):
        register_backend(Other)


class _ReleaseOldest(DenseBackend):
    """Releases each sequence's first block once it holds four; only the pool accounting is under test."""

    name = "test_release_oldest"

    def blocks_to_release(self, step: SeqStep) -> list[int]:
        return [0] if step.end > 3 * self.spec.block_size and int(step.block_table[0]) != 0 else []


def test_block_release_seam(make_engine, monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    register_backend(_ReleaseOldest)
    engine = make_engine()
    rid = engine.add_request([5] * 60, SamplingParams(max_tokens=20, ignore_eos=True),
                             attention_backend="test_release_oldest")
    engine.step()
    assert engine.kv_manager.block_table(rid)[0] == 0  # the null block took its place
    assert engine.kv_manager.num_held_blocks(rid) == 3
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.usage().used == 0


def test_async_engine_streams_and_aborts(make_engine):
    engine = make_engine()
    expected = engine.generate(["The old lighthouse"], SamplingParams(temperature=0, max_tokens=16,
                                                                      ignore_eos=True))[0].text
    aengine = AsyncEngine(engine)  # from here on only its thread touches the engine

    async def collect(prompt, limit=None):
        text, n = "", 0
        async for out in aengine.generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)):
            text += out.new_text
            n += 1
            if limit and n >= limit:
                break  # a client going away: the stream closes and the request is aborted
        return text, n

    async def main():
        with pytest.raises(ValueError, match="empty"):
            async for _ in aengine.generate([], None):
                pass
        full, cut = await asyncio.gather(collect("The old lighthouse"), collect("A ship at sea", limit=3))
        return full, cut

    try:
        (full_text, full_n), (_, cut_n) = asyncio.run(main())
        assert full_n == 16 and cut_n == 3
        assert full_text == expected
        for _ in range(100):
            if not engine.has_unfinished_requests():
                break
            asyncio.run(asyncio.sleep(0.05))
        assert not engine.has_unfinished_requests() and engine.usage().used == 0
    finally:
        aengine.shutdown()


def test_async_engine_builds_its_engine_on_the_loop_thread(make_engine):
    built_on = []

    def build():
        built_on.append(threading.current_thread())
        return make_engine()

    aengine = AsyncEngine(build)
    try:
        assert built_on == [aengine._thread] and aengine.stats.usage.used == 0

        async def first_text():
            async for out in aengine.generate("The old lighthouse", GREEDY):
                return out.new_text

        assert asyncio.run(first_text())
    finally:
        aengine.shutdown()

    def refuse():
        raise ValueError("max_model_len 99999 does not fit")

    before = set(threading.enumerate())
    with pytest.raises(ValueError, match="does not fit"):  # a build error reaches the caller; no thread is left
        AsyncEngine(refuse)
    assert set(threading.enumerate()) <= before
