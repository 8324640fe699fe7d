"""Schemathesis drives every route of the app's OpenAPI schema with generated bodies: nothing may be a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from attention_backends.base import NoParams
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from server.app import build_app
from server.config import ServedModel, ServerConfig


@pytest.fixture(scope="module")
def api_schema(loaded):
    # A short context bounds what any generated request can make the model do.
    engine = AsyncEngine(LLMEngine(EngineConfig(num_kv_blocks=64, max_model_len=48), loaded=loaded))
    app = build_app(engine, ServerConfig(engine.engine.config, [ServedModel("smollm2-135m", "dense", NoParams())]))
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    engine.shutdown()


def test_no_server_errors(api_schema):
    checked = []
    for result in api_schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call()
            assert response.status_code < 500, f"{case.method} {case.path} {case.body!r}: {response.text}"

        check()
        checked.append(f"{operation.method.upper()} {operation.path}")
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize"} <= set(checked)
