"""The FastAPI app: the routes (`routes.py`) over one AsyncEngine, with auth, the body limit and CORS."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from engine.async_engine import AsyncEngine
from server.admission import Admission
from server.config import ServerConfig
from server.errors import install_error_handlers
from server.guard import Guard
from server.metrics import EngineCollector, ServerMetrics
from server.routes import VERSION, router
from server.serving import Serving


def build_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    llm = engine.engine
    metrics = ServerMetrics(llm.max_model_len)
    admission = Admission(config.max_num_queued_tokens, llm.config.block_size)
    serving = Serving(engine, config, metrics, admission)
    metrics.registry.register(EngineCollector(engine, admission, serving.model_of.get,
                                              [m.name for m in config.served_models]))
    app = FastAPI(title="longserve", version=VERSION)
    app.state.serving = serving
    install_error_handlers(app)
    app.include_router(router)
    app.add_middleware(Guard, api_keys=config.api_keys, max_body_bytes=config.body_limit(llm.max_model_len))
    if config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
                           allow_credentials="*" not in config.allowed_origins)
    return app
