"""``create_app(settings)``: routers, middleware, error handlers and the lifespan."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Sized
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from service import __version__
from service.access import load_api_keys
from service.chat import routes as chat_routes
from service.classify import routes as classify_routes
from service.embeddings import routes as embeddings_routes
from service.errors import install_error_handlers
from service.frontend.processes import Frontends
from service.frontend.rows import ROWS_TYPE
from service.http import ops
from service.http.middleware import (
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    MetricsMiddleware,
    ReplicaHeaderMiddleware,
)
from service.http.strict import reject_unknown_query
from service.metrics import Metrics
from service.registry import admin
from service.runtime import Runtime
from service.settings import Settings
from service.ui import routes as ui_routes

OPEN_PATHS = ("/healthz", "/readyz", "/metrics")

log = logging.getLogger("promptswap")


def create_app(
    settings: Settings | None = None,
    on_fatal: Callable[[str], None] | None = None,
    frontends: Frontends | None = None,
) -> FastAPI:
    """Build the app; models load when its lifespan starts, never at import time.

    ``on_fatal`` is called with a message when start-up fails (the CLI exits then).
    ``frontends`` (``--frontends N``): this app is the model's process, behind front-end
    processes started once it may serve (stopped first at shutdown); it takes their rows.
    """
    settings = settings or Settings()
    metrics = Metrics(adapter_labels=settings.metrics_adapter_labels)
    # Read once, here: a missing or empty keys file stops the start-up (ValueError).
    api_keys = load_api_keys(settings.api_keys_file) if settings.api_keys_file else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("%s", startup_report(settings, api_keys))
        runtime = Runtime(settings, metrics)
        app.state.runtime = runtime
        runtime.start(on_fatal)
        try:
            if settings.wait_for_models:  # the port opens only once the models are ready
                await runtime.wait_ready()
            if frontends is not None:
                frontends.start(on_fatal)
            yield
        finally:
            if frontends is not None:
                await asyncio.to_thread(frontends.stop)  # they drain through this process
            await runtime.stop()

    app = FastAPI(
        title="promptswap",
        version=__version__,
        description="One frozen vision-language backbone, many hot-swappable prompt adapters.",
        lifespan=lifespan,
        dependencies=[Depends(reject_unknown_query)],  # every route, including ones added later
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.accept_rows = frontends is not None
    install_error_handlers(app)
    app.include_router(classify_routes.router)
    app.include_router(embeddings_routes.router)
    app.include_router(chat_routes.router)
    app.include_router(ops.router)
    app.include_router(admin.router)
    if settings.ui == "on":
        app.include_router(ui_routes.router)
    # Outermost last: metrics see every answer, including the body bound's 413.
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        large_prefix="/v1/admin/",
        large_max_bytes=settings.max_adapter_bytes + 2**20,  # room for the multipart framing
        exempt_type=ROWS_TYPE if frontends is not None else None,
    )
    if api_keys is not None:  # before the body is read; inside metrics, so 401s are counted
        # The playground page holds no secret: it asks for the caller's key and sends it itself.
        page = ui_routes.PUBLIC_PATHS if settings.ui == "on" else ()
        app.add_middleware(
            ApiKeyMiddleware, keys=api_keys, admin_token=settings.admin_token, open_paths=(*OPEN_PATHS, *page)
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(ReplicaHeaderMiddleware, replica_id=replica_id(settings))
    return app


def startup_report(settings: Settings, api_keys: Sized | None) -> str:
    """One block: every effective setting (secrets as set/unset), the store, what is on."""
    keys = f"on ({len(api_keys)} keys from {settings.api_keys_file})" if api_keys else "off"
    admin = "on" if settings.admin_token is not None else "off (no admin token)"
    lines = [
        f"promptswap {__version__} starting",
        f"adapter store: {settings.adapter_dir}",
        f"admin API: {admin}",
        f"API keys: {keys}",
        "settings:",
        *(f"  {line}" for line in settings.describe()),
    ]
    return "\n".join(lines)


def replica_id(settings: Settings) -> str:
    return settings.replica_id or f"{socket.gethostname()}-{os.getpid()}"
