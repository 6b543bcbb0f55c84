"""Operations: liveness, readiness, metrics, and what can be named."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..errors import error_body
from ..schemas import ModelCard, ModelList
from .deps import ReadyRuntimeDep, RuntimeDep

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Alive: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "models still loading or failed"}})
async def readyz(runtime: RuntimeDep) -> Response:
    """Ready: models are loaded and requests are being served."""
    if runtime.ready:
        return JSONResponse({"status": "ready"})
    message = runtime.load_error or "models are loading"
    return JSONResponse(error_body("not_ready", message), 503, headers={"Retry-After": "5"})


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus metrics in the text exposition format."""
    data = generate_latest(request.app.state.metrics.registry)
    return Response(data, media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", response_model=ModelList)
async def models(runtime: ReadyRuntimeDep) -> ModelList:
    """The backbones this service runs."""
    cards = []
    if runtime.clip is not None:
        cards.append(ModelCard(id=runtime.clip.model_id, kind="clip", task="classify"))
    return ModelList(data=cards)
