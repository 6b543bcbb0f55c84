"""Operations: liveness, readiness, metrics, and what can be named."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.access import caller_may_see
from service.errors import error_body
from service.http.deps import RuntimeDep, ServicesDep
from service.http.schemas import ModelCard, ModelList

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Alive: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "models still loading or failed"}})
async def readyz(runtime: RuntimeDep) -> Response:
    """Ready: models are loaded and requests are being served."""
    if runtime.services is not None:
        # An unreachable adapter store does not take the replica out of the load balancer:
        # zero-shot requests still serve, adapter requests answer 503 with the same reason.
        store = runtime.services.registry.store
        problem = await asyncio.get_running_loop().run_in_executor(runtime.decode_pool, store.health)
        if problem is not None:
            return JSONResponse({"status": "degraded", "adapter_store": problem})
        return JSONResponse({"status": "ready"})
    message = runtime.load_error or "models are loading"
    retry_after = str(runtime.settings.retry_after_unavailable_s)
    return JSONResponse(error_body("not_ready", message), 503, headers={"Retry-After": retry_after})


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus metrics in the text exposition format."""
    data = generate_latest(request.app.state.metrics.registry)
    return Response(data, media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", response_model=ModelList)
async def models(services: ServicesDep, runtime: RuntimeDep) -> ModelList:
    """What a request can name: the backbones, and each adapter as name, name@version,
    name@latest and name@alias."""
    cards = []
    if services.classify is not None:
        cards.append(ModelCard(id=services.classify.model_id, kind="clip", task="classify"))
    if services.chat is not None:
        cards.append(ModelCard(id=services.chat.model_id, kind="llava", task="chat"))
    registry = services.registry
    loop = asyncio.get_running_loop()
    for described in await loop.run_in_executor(runtime.decode_pool, registry.describe_all):
        if described.get("method") not in registry.placements:
            continue  # stored for a backbone this service does not run
        if not caller_may_see(described["name"]):
            continue  # outside the API key's scope
        task = "chat" if described["method"] == "m2pt" else "classify"
        for version in described["versions"]:
            cards.append(ModelCard(id=version["key"], kind="adapter", task=task))
        for alias in ("latest", *described["aliases"]):
            cards.append(ModelCard(id=f"{described['name']}@{alias}", kind="adapter", task=task))
        cards.append(ModelCard(id=described["name"], kind="adapter", task=task))
    return ModelList(data=cards)
