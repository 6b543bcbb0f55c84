"""Parsing and bounding an embeddings request; turning its inputs into queue rows.

Runs in the decode pool (image decoding, tokenizing): never on the event loop. Every
input is checked before any row is queued, so a request fails whole with a message
that names the input (``input[3]: ...``) rather than spending model time first.
"""

from __future__ import annotations

from pydantic import ValidationError

from service.backbones.clip import ClipBackbone
from service.classify.handler import PromptAdapter
from service.embeddings.handler import PLAIN_TEMPLATE, EmbedItem
from service.embeddings.schemas import EmbeddingsRequest
from service.errors import ApiError, BadRequest, Unprocessable
from service.http.images import decode_base64_image, decode_image
from service.http.schemas import DEFAULT_TEMPLATE
from service.http.strict import validation_message
from service.settings import Settings

IMAGE_PREFIX = "data:image/"


def parse_body(raw: bytes, s: Settings) -> EmbeddingsRequest:
    try:
        body = EmbeddingsRequest.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            raise BadRequest(f"the body is not valid JSON: {first['msg']}") from None
        raise Unprocessable(validation_message(exc, EmbeddingsRequest)) from None  # names the closest field
    if body.dimensions is not None:
        raise Unprocessable(
            "dimensions: not supported; a CLIP backbone's embeddings have one size (leave it out)"
        )
    inputs = as_list(body)
    limit = max_inputs(s)
    if not inputs:
        raise Unprocessable("input: at least one string is required")
    if len(inputs) > limit:
        raise Unprocessable(f"input: {len(inputs)} strings; at most {limit} per request")
    return body


def max_inputs(s: Settings) -> int:
    # Every input is a queue row: a request larger than the queue could never be admitted.
    return min(s.max_embedding_inputs, s.max_queue)


def as_list(body: EmbeddingsRequest) -> list[str]:
    return [body.input] if isinstance(body.input, str) else body.input


def template_of(adapter: PromptAdapter | None, adapter_template: str | None) -> str:
    """An adapter's texts go into its own template (what it was trained on); none: as given."""
    if adapter is None:
        return PLAIN_TEMPLATE
    return adapter_template or DEFAULT_TEMPLATE


def build_rows(
    inputs: list[str],
    clip: ClipBackbone,
    s: Settings,
    adapter: PromptAdapter | None,
    template: str,
    image_tokens: int,
) -> tuple[list[EmbedItem], int]:
    """Queue rows for ``inputs`` in order, and the request's token count (usage)."""
    rows: list[EmbedItem] = []
    texts: list[tuple[int, str]] = []
    for i, value in enumerate(inputs):
        if value.lstrip().startswith(IMAGE_PREFIX):
            try:
                data = decode_base64_image(value, max_bytes=s.max_body_bytes)
                draft = clip.draft_min_side if s.jpeg_draft else None  # opt-in: changes pixels
                pixels = clip.preprocess(
                    decode_image(data, max_pixels=s.max_image_pixels, draft_min_side=draft)
                )
            except ApiError as exc:
                exc.message = f"input[{i}]: {exc.message}"
                raise
            rows.append(EmbedItem(pixels=pixels, adapter=adapter))
        else:
            check_text(i, value, s)
            texts.append((i, value))
            rows.append(EmbedItem(text=value, template=template, adapter=adapter))
    tokens = image_tokens * (len(inputs) - len(texts))
    if texts:
        lengths = clip.token_lengths([template.replace("{}", text) for _, text in texts])
        limit = clip.max_text_tokens
        for (i, _), n in zip(texts, lengths, strict=True):
            if n > limit:
                where = "" if template == PLAIN_TEMPLATE else f" in the adapter's template {template!r}"
                raise Unprocessable(
                    f"input[{i}]: the text{where} is {n} tokens; the text encoder takes at most {limit}"
                )
        tokens += sum(lengths)
    return rows, tokens


def check_text(i: int, text: str, s: Settings) -> None:
    if not text.strip():
        raise Unprocessable(f"input[{i}]: the text is empty")
    if len(text) > s.max_embedding_text_chars:
        raise Unprocessable(
            f"input[{i}]: the text is {len(text)} characters; at most {s.max_embedding_text_chars}"
        )
    if "\x00" in text:
        raise Unprocessable(f"input[{i}]: the text contains a NUL character")
