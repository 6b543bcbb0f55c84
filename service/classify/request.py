"""``POST /v1/classify`` bodies: multipart or JSON, parsed and bounded before the queue."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from service.errors import BadRequest, Unprocessable, UnsupportedMediaType
from service.http.bodies import validated, validated_json
from service.http.images import decode_base64_image
from service.http.schemas import ClassifyJSON
from service.settings import Settings


@dataclass(frozen=True)
class ClassifyCall:
    """One classify request, checked against the bounds; the image is still encoded."""

    image: bytes
    labels: list[str]
    template: str | None  # None: the adapter's own template, else the default one
    top_k: int
    adapter: str | None  # "name" or "name@version"


async def parse_classify(request: Request, s: Settings) -> ClassifyCall:
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        body, image = await _parse_multipart(request, s)
    elif content_type.startswith("application/json"):
        body = validated_json(ClassifyJSON, await request.body())
        image = decode_base64_image(body.image, max_bytes=s.max_body_bytes)
    else:
        raise UnsupportedMediaType("send multipart/form-data or application/json")
    labels = check_labels(body.labels, s)
    return ClassifyCall(
        image=image,
        labels=labels,
        template=check_template(body.template, s),
        top_k=min(body.top_k or len(labels), len(labels)),
        adapter=body.adapter,
    )


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
    return validated(ClassifyJSON, fields), data


def check_labels(labels: list[str], s: Settings) -> list[str]:
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


def check_template(template: str | None, s: Settings) -> str | None:
    if template is None:
        return None
    if len(template) > s.max_template_chars:
        raise Unprocessable(f"template: at most {s.max_template_chars} characters")
    if template.count("{}") != 1:
        raise Unprocessable("template: must contain '{}' exactly once, where the label goes")
    return template
