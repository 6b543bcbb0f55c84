"""``create_app(settings)``: routers, middleware, error handlers and the lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from . import __version__
from .api import admin, chat, inference, ops
from .errors import install_error_handlers
from .metrics import Metrics
from .middleware import BodyLimitMiddleware, MetricsMiddleware
from .runtime import Runtime
from .settings import Settings


def create_app(
    settings: Settings | None = None, on_fatal: Callable[[str], None] | None = None
) -> FastAPI:
    """Build the app; models load when its lifespan starts, never at import time.

    ``on_fatal`` is called with a message when start-up fails (the CLI exits then).
    """
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(settings, metrics)
        app.state.runtime = runtime
        runtime.start(on_fatal)
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(
        title="promptswap",
        version=__version__,
        description="One frozen vision-language backbone, many hot-swappable prompt adapters.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    install_error_handlers(app)
    app.include_router(inference.router)
    app.include_router(chat.router)
    app.include_router(ops.router)
    app.include_router(admin.router)
    # Outermost last: metrics see every answer, including the body bound's 413.
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        large_prefix="/v1/admin/",
        large_max_bytes=settings.max_adapter_bytes + 2**20,  # room for the multipart framing
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
