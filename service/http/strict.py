"""Strict requests: a field nobody reads is a 422 naming it, never a silent default.

Three doors a field comes in by, one rule for each:
- JSON bodies are validated against models built on ``StrictModel`` (``extra="forbid"``);
  ``validation_message`` (used by http/bodies.py) turns pydantic's errors into one
  message, with the closest known field for a misspelt one.
- multipart forms are checked against the same model's field names by ``check_form``.
- query parameters are checked by ``reject_unknown_query``, an app-wide dependency that
  compares them with what the matched route declares: a new route is strict by default.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.datastructures import FormData

from service.errors import Unprocessable


class StrictModel(BaseModel):
    """A request model that refuses fields it does not declare."""

    model_config = ConfigDict(extra="forbid")


def unknown_field(name: str, known: Iterable[str], where: str = "") -> str:
    """``unknown field 'adaptor'; did you mean 'adapter'?`` (or the list of known fields)."""
    known = sorted(set(known))
    place = f" in {where}" if where else ""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f"unknown field {name!r}{place}; did you mean {close[0]!r}?"
    return f"unknown field {name!r}{place}; known fields: {', '.join(known)}"


def field_names(model: type[BaseModel]) -> list[str]:
    return [field.alias or name for name, field in model.model_fields.items()]


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The BaseModel classes an annotation can hold (through Optional, list, unions)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    origin = typing.get_origin(annotation)
    if origin is not None or isinstance(annotation, types.UnionType):
        for arg in typing.get_args(annotation):
            found.extend(_models_in(arg))
    return found


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel]:
    """The model that holds the field at ``loc`` (pydantic's error location)."""
    candidates = [model]
    for part in loc:
        if not isinstance(part, str):
            continue  # a list index
        by_name = {
            m.__name__: m
            for c in candidates
            for f in c.model_fields.values()
            for m in _models_in(f.annotation)
        }
        named = [m for m in candidates if m.__name__ == part] or ([by_name[part]] if part in by_name else [])
        if named:  # a union member's tag: the model itself
            candidates = named
            continue
        fields = [c.model_fields[part] for c in candidates if part in c.model_fields]
        inner = [m for f in fields for m in _models_in(f.annotation)]
        if inner:
            candidates = inner
    return candidates[0]


def _path(loc: tuple[Any, ...]) -> str:
    """``messages.0.content`` without pydantic's union tags (``list[...]``, class names)."""
    out = []
    for part in loc:
        if isinstance(part, int):
            out.append(str(part))
        elif isinstance(part, str) and not ("[" in part or part[:1].isupper()):
            out.append(part)
    return ".".join(out)


def validation_message(exc: ValidationError, model: type[BaseModel]) -> str:
    """One message for the first error: an unknown field names the closest known one."""
    errors = exc.errors()
    # An unknown field is the likeliest root cause of the rest (a misspelt required field).
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(first["loc"])
    if first["type"] == "extra_forbidden" and loc:
        holder = _model_at(model, loc[:-1])
        return unknown_field(str(loc[-1]), field_names(holder), _path(loc[:-1]))
    return f"{_path(loc) or 'body'}: {first['msg']}"


def check_form(form: FormData, known: Iterable[str]) -> None:
    """Every multipart field must be one the route reads."""
    known = list(known)
    for name in form.keys():
        if name not in known:
            raise Unprocessable(unknown_field(name, known))


def _declared_query(dependant: Any) -> set[str]:
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _declared_query(sub)
    return names


async def reject_unknown_query(request: Request) -> None:
    """App-wide dependency: a query parameter the route does not declare is a 422."""
    if not request.query_params:
        return
    route = request.scope.get("route")
    declared = _declared_query(route.dependant) if isinstance(route, APIRoute) else set()
    for name in request.query_params.keys():
        if name not in declared:
            if declared:
                raise Unprocessable(unknown_field(name, declared, "the query"))
            raise Unprocessable(f"unknown query parameter {name!r}; this route takes no query parameters")


def request_validation_message(request: Request, exc: RequestValidationError) -> str | None:
    """For a body FastAPI parsed itself (a route declaring a StrictModel parameter): the
    unknown field with the closest known one; None for any other error."""
    first = next((e for e in exc.errors() if e.get("type") == "extra_forbidden"), None)
    route = request.scope.get("route")
    if first is None or not isinstance(route, APIRoute):
        return None
    loc = tuple(first.get("loc", ()))
    models = [m for p in route.dependant.body_params for m in _models_in(p.field_info.annotation)]
    if not loc or loc[0] != "body" or not models:
        return None
    inner = loc[1:-1]
    if len(models) > 1 and inner:  # several body parameters: embedded under their names
        named = {p.alias: m for p in route.dependant.body_params for m in _models_in(p.field_info.annotation)}
        models, inner = [named.get(str(inner[0]), models[0])], inner[1:]
    holder = _model_at(models[0], inner)
    return unknown_field(str(loc[-1]), field_names(holder), _path(inner))
