"""``POST /v1/classify`` bodies: multipart or JSON, parsed and bounded before the queue."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from service.errors import ApiError, BadRequest, Unprocessable, UnsupportedMediaType
from service.http.bodies import validated, validated_json
from service.http.images import decode_base64_image
from service.http.schemas import ClassifyJSON
from service.http.strict import check_form, field_names
from service.registry.adapter_registry import LoadedAdapter
from service.settings import Settings


@dataclass(frozen=True)
class ClassifyCall:
    """One classify request, checked against the bounds. An image is still encoded, or (from
    a front-end process, service.frontend) its finished pixels or the error it answers with."""

    image: bytes | torch.Tensor | ApiError  # b"" when ``images`` is given
    labels: list[str] | None  # None: the adapter's own labels (from its manifest)
    template: str | None  # None: the adapter's own template, else the default one
    top_k: int | None  # None: every label
    adapter: str | None  # "name", "name@version" or "name@alias"
    # Several images (``images``): each as ``image`` is.
    images: list[bytes | torch.Tensor | ApiError] | None = None


async def parse_classify(request: Request, s: Settings) -> ClassifyCall:
    content_type = request.headers.get("content-type", "").lower()
    images: list[bytes | torch.Tensor | ApiError] | None = None
    if content_type.startswith("multipart/form-data"):
        body, image, files = await _parse_multipart(request, s)
        if files:
            images = list(files)
    elif content_type.startswith("application/json"):
        body = validated_json(ClassifyJSON, await request.body())
        image = b""
        if body.image is not None and body.images is None:
            image = decode_base64_image(body.image, max_bytes=s.max_body_bytes)
        elif body.images is not None:
            check_image_count(len(body.images), body.image is not None, s)
            images = [_decoded_or_error(value, s) for value in body.images]
    else:
        raise UnsupportedMediaType("send multipart/form-data or application/json")
    if images is None and body.image is None and not image:
        raise Unprocessable("image: an image is required (or images: a list of them)")
    return ClassifyCall(
        image=image,
        labels=check_labels(body.labels, s) if body.labels is not None else None,
        template=check_template(body.template, s),
        top_k=body.top_k,
        adapter=body.adapter,
        images=images,
    )


def max_images(s: Settings) -> int:
    # Every image is a queue row: a request with more than the queue holds could never be admitted.
    return min(s.max_images, s.max_queue)


def check_image_count(count: int, also_image: bool, s: Settings) -> None:
    if also_image:
        raise Unprocessable("images: send image or images, not both")
    if count == 0:
        raise Unprocessable("images: at least one image is required")
    if count > max_images(s):
        raise Unprocessable(f"images: {count} images; at most {max_images(s)} per request")


def _decoded_or_error(value: str, s: Settings) -> bytes | ApiError:
    try:
        return decode_base64_image(value, max_bytes=s.max_body_bytes)
    except ApiError as exc:  # that image's row answers with it; the others go on
        return exc


async def _parse_multipart(request: Request, s: Settings) -> tuple[ClassifyJSON, bytes, list[bytes]]:
    try:
        # A part may be one JSON array of every label: the body bound is the part bound;
        # labels are then checked one by one (422).
        form = await request.form(
            max_files=max_images(s), max_fields=2 * s.max_labels + 8, max_part_size=s.max_body_bytes
        )
    except HTTPException as exc:  # the parser's own bounds
        if "fields" in str(exc.detail):
            raise Unprocessable(f"too many form fields: at most {s.max_labels} labels") from None
        if "files" in str(exc.detail):
            raise Unprocessable(f"images: at most {max_images(s)} image files per request") from None
        raise BadRequest(f"malformed multipart body: {exc.detail}") from None
    check_form(form, field_names(ClassifyJSON))
    image = form.get("image")
    files = [f for f in form.getlist("images") if isinstance(f, UploadFile)]
    if files:
        check_image_count(len(files), image is not None, s)
        data = b""
    elif not isinstance(image, UploadFile):
        raise Unprocessable("image: a file field named 'image' is required (or 'images' fields)")
    else:
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
    # No labels field at all: the adapter's own labels; an explicit empty list is a 422.
    given = bool(raw_labels) or "labels" in form
    fields: dict[str, Any] = {"image": "", "labels": raw_labels if given else None}
    for name in ("adapter", "top_k", "template"):
        value = form.get(name)
        if isinstance(value, str) and value != "":
            fields[name] = value
    return validated(ClassifyJSON, fields), data, [await f.read() for f in files]


def labels_of(adapter: LoadedAdapter | None) -> list[str]:
    """The labels an adapter was trained with, for a request that gives none."""
    if adapter is not None and adapter.labels:
        return adapter.labels
    if adapter is not None:
        raise Unprocessable(
            f"labels: at least one label is required (adapter {adapter.key!r} stores none in its manifest)"
        )
    raise Unprocessable("labels: at least one label is required (or name an adapter that stores its labels)")


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
