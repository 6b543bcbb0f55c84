"""Shared body parsing: a pydantic model from JSON or form fields, its first error as the
client's 400 (not JSON at all) or 422 (JSON, but not what the route takes)."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from service.errors import BadRequest, Unprocessable
from service.http.strict import validation_message

M = TypeVar("M", bound=BaseModel)


def _first_error(exc: ValidationError, model: type[BaseModel]) -> Unprocessable:
    return Unprocessable(validation_message(exc, model))  # an unknown field names the closest known


def validated(model: type[M], data: Any) -> M:
    """``model`` from already-parsed fields (a form's)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _first_error(exc, model) from None


def validated_json(model: type[M], raw: bytes) -> M:
    """``model`` from a JSON body."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        if exc.errors()[0]["type"] == "json_invalid":
            raise BadRequest(f"the body is not valid JSON: {exc.errors()[0]['msg']}") from None
        raise _first_error(exc, model) from None
