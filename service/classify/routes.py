"""``POST /v1/classify``: parse and bound the request, decode off the loop, queue, answer."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from service.classify.handler import ClassifyItem
from service.errors import (
    BadRequest,
    DeadlineExceeded,
    Overloaded,
    Unavailable,
    Unprocessable,
    UnsupportedMediaType,
)
from service.http.admission import Place
from service.http.deps import ReadyRuntimeDep, admitted
from service.http.disconnect import ClientGone, unless_disconnected
from service.http.images import decode_base64_image, decode_image
from service.http.schemas import (
    DEFAULT_TEMPLATE,
    ClassifyJSON,
    ClassifyResponse,
    ErrorBody,
    LabelScore,
    inline_schema,
)
from service.registry.adapter_registry import LoadedAdapter
from service.runtime import Runtime
from service.scheduling.batcher import Closed, Expired, QueueFull
from service.settings import Settings

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
    "labels": {"type": "array", "items": {"type": "string"}},
    "adapter": {"type": "string"},
    "top_k": {"type": "integer", "minimum": 1},
    "template": {"type": "string"},
}
CLASSIFY_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["image", "labels"], "properties": _FIELDS}
            },
            "application/json": {"schema": inline_schema(ClassifyJSON)},
        },
    }
}


@router.post(
    "/v1/classify",
    response_model=ClassifyResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=CLASSIFY_BODY,
)
async def classify(request: Request, runtime: ReadyRuntimeDep) -> Any:
    """Classify one image against a label set, zero-shot or with a prompt adapter."""
    s = runtime.settings
    if runtime.clip is None or runtime.classify_gate is None:
        raise Unavailable("this service runs no CLIP backbone", retry_after_s=3600)
    with admitted(runtime.classify_gate, runtime, "classify") as place:  # before the body is read
        body, image_bytes = await _parse_classify(request, s)
        labels = _check_labels(body.labels, s)
        template = _check_template(body.template, s)
        top_k = min(body.top_k or len(labels), len(labels))
        adapter = await runtime.acquire_adapter(body.adapter, method="maple")
        try:
            # An adapter is used with the template it was trained with unless told otherwise.
            template = template or (adapter.template if adapter else None) or DEFAULT_TEMPLATE
            return await _classify(request, runtime, place, image_bytes, labels, template, top_k, adapter)
        finally:
            runtime.release_adapter(adapter)


async def _classify(
    request: Request,
    runtime: Runtime,
    place: Place,
    image_bytes: bytes,
    labels: list[str],
    template: str,
    top_k: int,
    adapter: LoadedAdapter | None,
) -> Any:
    s = runtime.settings
    queue = runtime.classify_queue
    loop = asyncio.get_running_loop()
    clip = runtime.clip
    pixels = await loop.run_in_executor(
        runtime.decode_pool,
        lambda: clip.preprocess(decode_image(image_bytes, max_pixels=s.max_image_pixels)),
    )
    item = ClassifyItem(pixels, labels, template, adapter)
    place.release()  # queued from here on: the queue's bound counts it
    try:
        result = await unless_disconnected(request, queue.submit(item, s.request_timeout_s))
    except QueueFull as exc:
        runtime.metrics.rejected.labels("classify", "queue_full").inc()
        raise Overloaded(f"server busy: {exc}", retry_after_s=1) from None
    except Expired as exc:
        runtime.metrics.rejected.labels("classify", "deadline").inc()
        raise DeadlineExceeded(str(exc)) from None
    except Closed:
        raise Unavailable("shutting down", retry_after_s=5) from None
    except ClientGone:
        runtime.metrics.rejected.labels("classify", "client_gone").inc()
        return Response(status_code=499)

    scores = _softmax(result.logits)
    ranked = sorted(range(len(labels)), key=lambda i: -scores[i])[:top_k]
    return ClassifyResponse(
        model=clip.model_id,
        adapter=adapter.key if adapter is not None else None,
        labels=[LabelScore(label=labels[i], score=scores[i], logit=result.logits[i]) for i in ranked],
    )


async def _parse_classify(request: Request, s: Settings) -> tuple[ClassifyJSON, bytes]:
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        return await _parse_multipart(request, s)
    if content_type.startswith("application/json"):
        raw = await request.body()
        try:
            body = ClassifyJSON.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            if first["type"] == "json_invalid":
                raise BadRequest(f"the body is not valid JSON: {first['msg']}") from None
            loc = ".".join(str(p) for p in first["loc"]) or "body"
            raise Unprocessable(f"{loc}: {first['msg']}") from None
        return body, decode_base64_image(body.image, max_bytes=s.max_body_bytes)
    raise UnsupportedMediaType("send multipart/form-data or application/json")


async def _parse_multipart(request: Request, s: Settings) -> tuple[ClassifyJSON, bytes]:
    try:
        # A part may be one JSON array of every label: the body bound is the part bound;
        # labels are then checked one by one (422).
        form = await request.form(
            max_files=1, max_fields=2 * s.max_labels + 8, max_part_size=s.max_body_bytes
        )
    except HTTPException as exc:  # the parser's own bounds
        if "fields" in str(exc.detail):
            raise Unprocessable(f"too many form fields: at most {s.max_labels} labels") from None
        raise BadRequest(f"malformed multipart body: {exc.detail}") from None
    image = form.get("image")
    if not isinstance(image, UploadFile):
        raise Unprocessable("image: a file field named 'image' is required")
    data = await image.read()
    raw_labels = [v for v in form.getlist("labels") if isinstance(v, str)]
    if len(raw_labels) == 1 and raw_labels[0].lstrip().startswith("["):
        try:
            parsed = json.loads(raw_labels[0])
        except json.JSONDecodeError:
            raise Unprocessable("labels: not a valid JSON array") from None
        if not isinstance(parsed, list) or not all(isinstance(x, str) for x in parsed):
            raise Unprocessable("labels: the JSON array must hold strings")
        raw_labels = parsed
    fields: dict[str, Any] = {"image": "", "labels": raw_labels}
    for name in ("adapter", "top_k", "template"):
        value = form.get(name)
        if isinstance(value, str) and value != "":
            fields[name] = value
    try:
        body = ClassifyJSON.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise Unprocessable(f"{loc}: {first['msg']}") from None
    return body, data


def _check_labels(labels: list[str], s: Settings) -> list[str]:
    if not labels:
        raise Unprocessable("labels: at least one label is required")
    if len(labels) > s.max_labels:
        raise Unprocessable(f"labels: {len(labels)} labels; at most {s.max_labels} are allowed")
    seen: set[str] = set()
    for label in labels:
        if not label.strip():
            raise Unprocessable("labels: a label is empty")
        if len(label) > s.max_label_chars:
            raise Unprocessable(f"labels: a label is {len(label)} characters; at most {s.max_label_chars}")
        if "\x00" in label:
            raise Unprocessable("labels: a label contains a NUL character")
        if label in seen:
            raise Unprocessable(f"labels: {label[:40]!r} appears more than once")
        seen.add(label)
    return labels


def _check_template(template: str | None, s: Settings) -> str | None:
    if template is None:
        return None
    if len(template) > s.max_template_chars:
        raise Unprocessable(f"template: at most {s.max_template_chars} characters")
    if template.count("{}") != 1:
        raise Unprocessable("template: must contain '{}' exactly once, where the label goes")
    return template


def _softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = sum(exps)
    return [e / total for e in exps]
