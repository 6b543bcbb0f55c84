"""Dependencies shared by the routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..errors import Unavailable
from ..runtime import Runtime


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise Unavailable("the service is starting")
    return runtime


def get_ready_runtime(request: Request) -> Runtime:
    runtime = get_runtime(request)
    if not runtime.ready:
        raise Unavailable(runtime.load_error or "models are loading", retry_after_s=5)
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
ReadyRuntimeDep = Annotated[Runtime, Depends(get_ready_runtime)]
