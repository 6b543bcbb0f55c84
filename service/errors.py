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


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class NotFound(ApiError):
    status, code = 404, "not_found"


class NotServed(NotFound):
    """A route or model for a backbone this service does not run: permanent, so never 503
    (a load balancer would retry it elsewhere, and a client would wait for it)."""

    code = "not_served"


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

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class Unavailable(ApiError):
    status, code = 503, "unavailable"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class DeadlineExceeded(ApiError):
    status, code = 504, "deadline_exceeded"


class InsufficientStorage(ApiError):
    status, code = 507, "insufficient_storage"


class ContextTooLong(BadRequest):
    code = "context_length_exceeded"


# ---------------------------------------------------------------- domain errors
# Raised by the registry and the store, which know no HTTP; ``api_error`` says what each
# means for the client, here and nowhere else.


class DomainError(Exception):
    """A refusal of the service's own parts (registry, store), with a message for the client."""


class AdapterNotFound(DomainError):
    """No stored adapter answers to the ref (or it was deleted meanwhile)."""


class WrongMethod(DomainError):
    """The adapter is of another method than the endpoint serves (MaPLe vs M2PT)."""


class NoBackboneFor(DomainError):
    """The adapter's method needs a backbone this replica does not run."""


class AdapterCorrupted(DomainError):
    """A stored adapter file fails to read or verify: the store's fault, not the client's."""


class DeviceFull(DomainError):
    """No device memory left for an adapter while every loaded one is in use."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class StoreUnavailable(DomainError):
    """The adapter store did not answer (down, unreachable, timed out): retry later."""

    def __init__(self, message: str, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class StoreLacks(DomainError):
    """The configured store cannot do this (a permanent condition, not a retry)."""


class StoreMisconfigured(DomainError):
    """The adapter store refuses us for good (credentials, missing bucket)."""


class AdapterCorruptedError(ApiError):
    status, code = 500, "adapter_corrupted"


class StoreUnavailableError(Unavailable):
    code = "adapter_store_unavailable"


class StoreMisconfiguredError(ApiError):
    status, code = 500, "adapter_store_misconfigured"


def api_error(exc: DomainError) -> ApiError:
    """The HTTP answer to a domain error."""
    message = str(exc)
    if isinstance(exc, AdapterNotFound):
        return NotFound(message)
    if isinstance(exc, WrongMethod):
        return Unprocessable(message)
    if isinstance(exc, NoBackboneFor):
        return Conflict(message)
    if isinstance(exc, DeviceFull):
        return Unavailable(message, retry_after_s=exc.retry_after_s)
    if isinstance(exc, AdapterCorrupted):
        return AdapterCorruptedError(message)
    if isinstance(exc, StoreUnavailable):
        return StoreUnavailableError(message, retry_after_s=exc.retry_after_s)
    if isinstance(exc, StoreLacks):
        return Conflict(message)
    if isinstance(exc, StoreMisconfigured):
        return StoreMisconfiguredError(message)
    return ApiError(message)


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

    @app.exception_handler(DomainError)
    async def _domain_error(request: Request, exc: DomainError) -> JSONResponse:
        return await _api_error(request, api_error(exc))

    @app.exception_handler(adapter_errors.AdapterError)
    async def _adapter_error(_: Request, exc: adapter_errors.AdapterError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, str(exc)), adapter_error_status(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        from service.http.strict import request_validation_message  # strict builds on this module

        details = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))} for e in exc.errors()]
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        message = request_validation_message(request, exc) or (
            f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
        )
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
