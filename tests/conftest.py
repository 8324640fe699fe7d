"""One embedded model per test session; engines built over it are cheap."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():  # read when a Triton kernel is defined: before any kernel module is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.model_loader import LoadedModel, load_model  # noqa: E402

torch.set_num_threads(max(1, os.cpu_count() or 1))

_TOPICS = ["river", "lantern", "orchard", "glacier", "market", "violin", "harbor", "comet", "library", "meadow"]
_VERBS = ["guards", "remembers", "paints", "measures", "follows", "hides", "repairs", "counts", "greets", "studies"]


def natural_text(num_sentences: int, seed: int = 0) -> str:
    """Varied, deterministic prose: distinct facts avoid the near-tied logits of repeated text."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num_sentences):
        a, b, c = (int(x) for x in torch.randint(0, 10, (3,), generator=g))
        out.append(f"In chapter {i + 1}, the keeper of the {_TOPICS[a]} {_VERBS[b]} the old {_TOPICS[c]} "
                   f"near house number {int(torch.randint(1, 999, (1,), generator=g))}.")
    return " ".join(out)


@pytest.fixture(scope="session")
def loaded() -> LoadedModel:
    return load_model(None, progress=False)


@pytest.fixture
def calibration_cache(tmp_path_factory, monkeypatch):
    """Calibration artifacts go to a cache of this test session, made once on first use like a fresh install's."""
    monkeypatch.setenv("LONGSERVE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def make_engine(loaded: LoadedModel):
    def make(**overrides) -> LLMEngine:
        overrides.setdefault("num_kv_blocks", 1200)
        overrides.setdefault("max_model_len", 4096)
        return LLMEngine(EngineConfig(**overrides), loaded=loaded)

    return make


@pytest.fixture(scope="session")
def hf_reference(loaded: LoadedModel):
    """The same weights under stock transformers (sdpa, its own cache): the oracle for the engine."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(loaded.path, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


@pytest.fixture(scope="session")
def server_engine(loaded: LoadedModel):
    """The engine behind every in-process test server (one at a time uses it; they run sequentially)."""
    from engine.async_engine import AsyncEngine

    engine = AsyncEngine(LLMEngine(EngineConfig(num_kv_blocks=1200, max_model_len=4096, max_num_batched_tokens=2048),
                                   loaded=loaded))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def start_server(server_engine):
    """Starts a real uvicorn server on a free loopback port over the shared engine, with config overrides."""
    from server_harness import RunningServer

    running: list[RunningServer] = []

    def start(**overrides) -> RunningServer:
        server = RunningServer(server_engine, **overrides)
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server):
    return start_server()
