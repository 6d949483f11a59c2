"""The FastAPI app of `hatrack serve`: start-up, shutdown and what every route shares.

The base model loads on a background thread so /health answers at once and /ready
says when the model is there; /v1 calls get 503 until then. The routes live in
routes.py, the configuration and shared state in state.py.
"""

from __future__ import annotations

import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from hatrack.registry import Registry
from hatrack.server.dashboard import install_dashboard
from hatrack.server.errors import install_error_handlers
from hatrack.server.limits import BodyLimit, JSONBodyRoute
from hatrack.server.openapi import install_openapi
from hatrack.server.routes import install_routes
from hatrack.server.state import ServeConfig, ServerState, warn_if_keyed_without_keys

__all__ = ["ServeConfig", "ServerState", "create_app"]


def create_app(config: ServeConfig | None = None, registry: Registry | None = None) -> FastAPI:
    config = config or ServeConfig()
    state = ServerState(config, registry or Registry())

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        warn_if_keyed_without_keys(state)
        threading.Thread(target=state.load, name="hatrack-load", daemon=True).start()
        yield
        if state.engine is not None:
            await run_in_threadpool(state.engine.stop, config.shutdown_timeout)

    app = FastAPI(title="hatrack", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible completions over one base model and its LoRA adapters.")
    app.router.route_class = JSONBodyRoute
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.state.hatrack = state
    install_error_handlers(app)
    install_openapi(app)
    install_routes(app)
    install_dashboard(app, state)
    return app
