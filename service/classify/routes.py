"""``POST /v1/classify``: parse and bound the request, hand it to the classify service, answer."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from service.classify.request import parse_classify
from service.classify.service import Ranked
from service.errors import ApiError
from service.frontend.rows import decode_call, forwarded_rows, read_body
from service.http.deps import ClassifyDep, ServicesDep
from service.http.disconnect import ClientGone, unless_disconnected
from service.http.schemas import (
    ClassifiedRow,
    ClassifyJSON,
    ClassifyManyResponse,
    ClassifyResponse,
    ErrorBody,
    ErrorDetail,
    FailedRow,
    LabelScore,
    inline_schema,
)

router = APIRouter(tags=["inference"])

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "image not decodable, malformed body",
        404: "unknown adapter",
        413: "body or image over its bound",
        415: "unsupported content type or image format",
        422: "invalid labels, template or parameters",
        429: "queue full (see Retry-After)",
        503: "not ready or shutting down (see Retry-After)",
        504: "deadline passed",
    }.items()
}

_FIELDS = {
    "image": {"type": "string", "format": "binary"},
    "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
    "labels": {"type": "array", "items": {"type": "string"}},
    "adapter": {"type": "string"},
    "top_k": {"type": "integer", "minimum": 1},
    "template": {"type": "string"},
}
CLASSIFY_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": _FIELDS}},
            "application/json": {"schema": inline_schema(ClassifyJSON)},
        },
    }
}


@router.post(
    "/v1/classify",
    response_model=ClassifyResponse | ClassifyManyResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=CLASSIFY_BODY,
)
async def classify(request: Request, service: ClassifyDep, services: ServicesDep) -> Any:
    """Classify one image (``image``) or several (``images``, answered as ``results`` in
    order) against a label set, zero-shot or with a prompt adapter."""
    with service.lane.admit() as place:  # before the body is read
        if forwarded_rows(request):  # a front-end process parsed and decoded it
            body = await read_body(request)
            call = decode_call(body, service.settings, service.clip.row_shapes)
        else:
            call = await parse_classify(request, service.settings)
        services.refuse_backbone_name(call.adapter, "maple")
        try:
            if call.images is not None:
                used, rows = await unless_disconnected(request, service.classify_many(call, place))
            else:
                ranked = await unless_disconnected(request, service.classify(call, place))
        except ClientGone:
            service.lane.client_gone()
            return Response(status_code=499)
    if call.images is not None:
        return ClassifyManyResponse(
            model=service.model_id,
            adapter=used,
            results=[_row(i, r) for i, r in enumerate(rows)],
        )
    return ClassifyResponse(model=ranked.model, adapter=ranked.adapter, labels=_scores(ranked))


def _scores(ranked: Ranked) -> list[LabelScore]:
    return [LabelScore(label=label, score=score, logit=logit) for label, score, logit in ranked.labels]


def _row(index: int, row: Ranked | ApiError) -> ClassifiedRow | FailedRow:
    if isinstance(row, ApiError):
        return FailedRow(index=index, error=ErrorDetail(code=row.code, message=row.message))
    return ClassifiedRow(index=index, labels=_scores(row))
