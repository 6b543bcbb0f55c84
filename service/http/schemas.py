"""Request and response models of the public API."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from service.http.strict import StrictModel

DEFAULT_TEMPLATE = "a photo of a {}."


class ClassifyJSON(StrictModel):
    """``POST /v1/classify`` as JSON; multipart/form-data takes the same fields."""

    image: str | None = Field(None, description="The image as base64 or a data: URL (no remote URLs).")
    images: list[str] | None = Field(
        None,
        description="Several images instead of one (not both), answered as 'results' in the same "
        "order; each is classified as a request of its own would be and fails alone.",
    )
    labels: list[str] | None = Field(
        None,
        description="Candidate labels, unique, at least one; without them, the adapter's own "
        "(from its manifest, as trained).",
    )
    adapter: str | None = Field(None, description="Adapter as 'name' (latest) or 'name@version'.")
    top_k: int | None = Field(None, ge=1, description="Return only the k most probable labels.")
    template: str | None = Field(
        None, description=f"Prompt template with one '{{}}' for the label; default {DEFAULT_TEMPLATE!r}."
    )


class LabelScore(BaseModel):
    label: str
    score: float = Field(description="Softmax over the request's labels of logit_scale * cosine.")
    logit: float = Field(description="logit_scale * cosine similarity of image and prompt.")


class ClassifyResponse(BaseModel):
    model: str
    adapter: str | None = Field(description="'name@version' of the adapter used, or null.")
    labels: list[LabelScore] = Field(description="Sorted by score, highest first.")


class ClassifiedRow(BaseModel):
    index: int = Field(description="The image's place in the request's images.")
    labels: list[LabelScore] = Field(description="Sorted by score, highest first.")


class FailedRow(BaseModel):
    index: int
    error: ErrorDetail = Field(description="This image's error, as a request of its own would get.")


class ClassifyManyResponse(BaseModel):
    """The answer to a request with ``images``: one row per image, in order."""

    model: str
    adapter: str | None = Field(description="'name@version' of the adapter used, or null.")
    results: list[ClassifiedRow | FailedRow]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    kind: str
    task: str
    owned_by: str = "promptswap"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema with its ``$defs`` inlined, for a hand-written requestBody
    (a ``#/$defs/...`` reference would name nothing inside /openapi.json)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    return resolve(schema)
