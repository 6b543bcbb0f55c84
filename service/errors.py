"""Typed errors and the one JSON error body: ``{"error": {"code", "message"}}``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters import errors as adapter_errors

log = logging.getLogger("promptswap")


class ApiError(Exception):
    """An error with an HTTP status, a stable machine-readable code and a human message."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class InvalidImage(ApiError):
    status, code = 400, "invalid_image"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"

    def __init__(self, message: str = "missing or wrong bearer token") -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class NotFound(ApiError):
    status, code = 404, "not_found"


class Conflict(ApiError):
    status, code = 409, "conflict"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"


class Unprocessable(ApiError):
    status, code = 422, "invalid_request"


class Overloaded(ApiError):
    status, code = 429, "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class Unavailable(ApiError):
    status, code = 503, "unavailable"

    def __init__(self, message: str, retry_after_s: int = 5) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class DeadlineExceeded(ApiError):
    status, code = 504, "deadline_exceeded"


class InsufficientStorage(ApiError):
    status, code = 507, "insufficient_storage"


# What each adapter-library error means for the client that sent the adapter.
ADAPTER_ERROR_STATUS: dict[type[adapter_errors.AdapterError], int] = {
    adapter_errors.AdapterFormatError: 400,
    adapter_errors.AdapterChecksumError: 400,
    adapter_errors.AdapterTooLarge: 413,
    adapter_errors.AdapterValueError: 422,
    adapter_errors.AdapterNameError: 422,
    adapter_errors.AdapterMismatch: 409,
}


def adapter_error_status(exc: adapter_errors.AdapterError) -> int:
    for cls in type(exc).__mro__:
        if cls in ADAPTER_ERROR_STATUS:
            return ADAPTER_ERROR_STATUS[cls]
    return 400


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message), exc.status, headers=exc.headers)

    @app.exception_handler(adapter_errors.AdapterError)
    async def _adapter_error(_: Request, exc: adapter_errors.AdapterError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, str(exc)), adapter_error_status(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))} for e in exc.errors()]
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        message = f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
        return JSONResponse(error_body("invalid_request", message, details=details), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            error_body(code, str(exc.detail)), exc.status_code, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body("internal_error", "internal server error"), 500)
