"""Dependencies shared by the routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.errors import Overloaded, Unavailable
from service.http.admission import ArrivalGate, NoPlace, Place
from service.runtime import Runtime


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


def admitted(gate: ArrivalGate, runtime: Runtime, queue: str, retry_after_s: int = 1) -> Place:
    """A place at ``gate`` for this request, else 429 before its body is read."""
    try:
        return gate.enter()
    except NoPlace as exc:
        runtime.metrics.rejected.labels(queue, "queue_full").inc()
        raise Overloaded(f"server busy: {exc}", retry_after_s=retry_after_s) from None
