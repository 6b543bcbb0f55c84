"""The body a front-end process sends the model's process for ``POST /v1/classify``.

A front end parses the public request and decodes and preprocesses its images; what it
forwards is the parsed call with each image's finished pixels (or the error that image
answers with), or the error the whole request answers with. The model's process reads it
where it would have parsed the public body, so every check that follows (admission,
adapter, labels, queue) runs in the same order as in one process, and every answer,
metric and error body comes from there.

Layout: a 4-byte big-endian header length, the header as JSON, then each row's pixels
as raw bytes in row order (no pickle: the header says each row's dtype and shape).
"""

from __future__ import annotations

import math
import struct

import torch
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.classify.request import ClassifyCall, check_image_count, check_labels, check_template
from service.errors import ApiError, BadRequest
from service.settings import Settings

ROWS_TYPE = "application/vnd.promptswap.classify-rows"
_DTYPES = {"float32": torch.float32, "uint8": torch.uint8}
_LENGTH = struct.Struct(">I")


class _Error(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: int = Field(ge=400, le=599)
    code: str
    message: str
    headers: dict[str, str] = {}


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dtype: str | None = None
    shape: list[int] | None = None
    error: _Error | None = None


class _Header(BaseModel):
    model_config = ConfigDict(extra="forbid")
    error: _Error | None = None  # the whole request's answer
    labels: list[str] | None = None
    template: str | None = None
    top_k: int | None = Field(None, ge=1)
    adapter: str | None = None
    many: bool = False  # ``images`` (answered as ``results``) rather than ``image``
    rows: list[_Row] = []


def _error(exc: ApiError) -> _Error:
    return _Error(status=exc.status, code=exc.code, message=exc.message, headers=exc.headers)


def _api_error(error: _Error) -> ApiError:
    exc = ApiError(error.message, headers=dict(error.headers))
    exc.status, exc.code = error.status, error.code  # the front end's typed error, as it was
    return exc


def _pack(header: _Header, payloads: list[bytes]) -> bytes:
    head = header.model_dump_json(exclude_defaults=True).encode()
    return b"".join([_LENGTH.pack(len(head)), head, *payloads])


def encode_error(exc: ApiError) -> bytes:
    """The body of a request that fails as a whole with ``exc`` (found while parsing it)."""
    return _pack(_Header(error=_error(exc)), [])


def encode_call(call: ClassifyCall, rows: list[torch.Tensor | ApiError], many: bool) -> bytes:
    """``call`` with its images replaced by ``rows``: each image's pixels, or its error."""
    header = _Header(
        labels=call.labels, template=call.template, top_k=call.top_k, adapter=call.adapter, many=many
    )
    payloads: list[bytes] = []
    for row in rows:
        if isinstance(row, ApiError):
            header.rows.append(_Row(error=_error(row)))
            continue
        pixels = row.contiguous()
        header.rows.append(_Row(dtype=str(pixels.dtype).removeprefix("torch."), shape=list(pixels.shape)))
        payloads.append(pixels.numpy().tobytes())
    return _pack(header, payloads)


def decode_call(body: bytearray, s: Settings, shapes: dict[torch.dtype, tuple[int, ...]]) -> ClassifyCall:
    """The call a front end forwarded; raises the error it found, if it found one.

    ``shapes`` are the rows this process's model takes, by dtype: a row of any other shape
    or dtype is refused, as is a header that does not parse (400: a front end of another version).
    """
    try:
        (length,) = _LENGTH.unpack_from(body)
        header = _Header.model_validate_json(bytes(body[_LENGTH.size : _LENGTH.size + length]))
    except (struct.error, ValidationError) as exc:
        raise BadRequest(f"malformed front-end rows: {exc}") from None
    if header.error is not None:
        raise _api_error(header.error)
    offset = _LENGTH.size + length
    rows: list[bytes | torch.Tensor | ApiError] = []
    for row in header.rows:
        if row.error is not None:
            rows.append(_api_error(row.error))
            continue
        dtype = _DTYPES.get(row.dtype or "")
        shape = shapes.get(dtype) if dtype is not None else None
        if dtype is None or shape is None or tuple(row.shape or ()) != shape:
            raise BadRequest(f"front-end rows: a row is {row.dtype} {row.shape}; this model takes {shapes}")
        count = math.prod(shape)
        if offset + count * dtype.itemsize > len(body):
            raise BadRequest("front-end rows: the body ends inside a row")
        rows.append(torch.frombuffer(body, dtype=dtype, count=count, offset=offset).view(shape))
        offset += count * dtype.itemsize
    if offset != len(body) or (not header.many and len(rows) != 1):
        raise BadRequest("front-end rows: the rows do not match the body")
    if header.many:
        check_image_count(len(rows), False, s)
    return ClassifyCall(
        image=rows[0] if not header.many else b"",
        labels=check_labels(header.labels, s) if header.labels is not None else None,
        template=check_template(header.template, s),
        top_k=header.top_k,
        adapter=header.adapter,
        images=rows if header.many else None,
    )


def forwarded_rows(request: Request) -> bool:
    """Whether ``request`` is a front end's rows body, on an app started to take them."""
    accepts = getattr(request.app.state, "accept_rows", False)
    return accepts and request.headers.get("content-type") == ROWS_TYPE


async def read_body(request: Request) -> bytearray:
    """The whole body in one writable buffer, so the rows' tensors are views of it."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
    return body
