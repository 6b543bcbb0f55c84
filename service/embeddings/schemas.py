"""Request and response models of ``POST /v1/embeddings`` (OpenAI's shape)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        description="The CLIP backbone's served name (no adapter) or an adapter: 'name' (latest) "
        "or 'name@version' (see GET /v1/models)."
    )
    input: str | list[str] = Field(
        description="A string or a list of strings. A 'data:image/...;base64,' URL is an image; "
        "any other string is a text."
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="'float': lists of numbers; 'base64': little-endian float32 bytes."
    )
    dimensions: int | None = Field(
        None, description="Refused: a CLIP backbone's embeddings have one size (see the answer)."
    )

    @field_validator("input", mode="before")
    @classmethod
    def _strings_only(cls, value: Any) -> Any:
        if isinstance(value, list) and any(isinstance(v, int | list) for v in value):
            raise ValueError("token arrays are not accepted: send texts and data:image URLs as strings")
        if isinstance(value, int):
            raise ValueError("token arrays are not accepted: send texts and data:image URLs as strings")
        return value


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="L2-normalised; base64 of float32 LE if asked.")


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Text tokens (with start and end) plus image tokens.")
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage
