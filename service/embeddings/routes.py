"""``POST /v1/embeddings``: OpenAI's embeddings call on the CLIP backbone.

Parse and bound the body, hand it to the embeddings service, answer in input order.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import APIRouter, Depends, Request, Response

from service.embeddings import request as parsing
from service.embeddings.schemas import Embedding, EmbeddingsRequest, EmbeddingsResponse, Usage
from service.embeddings.service import EmbeddingsService
from service.errors import NotFound, NotServed, UnsupportedMediaType
from service.http.deps import RuntimeDep, ServicesDep
from service.http.disconnect import ClientGone, unless_disconnected
from service.http.schemas import ErrorBody, inline_schema

router = APIRouter(tags=["inference"])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "an image is not decodable, malformed body",
        404: "unknown model or adapter, or no CLIP backbone",
        413: "body or image over its bound",
        415: "not JSON",
        422: "invalid input, too many inputs, a text too long, dimensions given",
        429: "queue full (see Retry-After)",
        503: "not ready or shutting down (see Retry-After)",
        504: "deadline passed",
    }.items()
}


async def get_embeddings(services: ServicesDep, runtime: RuntimeDep) -> EmbeddingsService:
    if services.embeddings is None:
        raise NotServed(
            "this service runs no CLIP backbone, so it serves no embeddings; start it with --clip-model "
            "(GET /v1/models lists what it serves)"
        )
    return services.embeddings


EmbeddingsDep = Annotated[EmbeddingsService, Depends(get_embeddings)]


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingsResponse,
    responses=ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": inline_schema(EmbeddingsRequest)}},
        }
    },
)
async def embeddings(request: Request, service: EmbeddingsDep) -> Any:
    """L2-normalised CLIP embeddings of texts and images (data: URLs), zero-shot or
    through a MaPLe adapter: their dot products are what /v1/classify scales by logit_scale."""
    if not request.headers.get("content-type", "").lower().startswith("application/json"):
        raise UnsupportedMediaType("send application/json")
    with service.lane.admit() as place:  # before the body is read
        body = parsing.parse_body(await request.body(), service.settings)
        if not body.model.strip():
            raise NotFound("model: name the CLIP backbone or an adapter (see GET /v1/models)")
        try:
            embedded = await unless_disconnected(request, service.embed(body, place))
        except ClientGone:
            service.lane.client_gone()
            return Response(status_code=499)
    return EmbeddingsResponse(
        data=[
            Embedding(index=i, embedding=encoded(v, body.encoding_format))
            for i, v in enumerate(embedded.vectors)
        ],
        model=body.model,
        usage=Usage(prompt_tokens=embedded.tokens, total_tokens=embedded.tokens),
    )


def encoded(vector: torch.Tensor, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # what OpenAI sends: float32 little-endian bytes
        return base64.b64encode(np.asarray(vector.numpy(), dtype="<f4").tobytes()).decode("ascii")
    return vector.tolist()
