"""Pure ASGI middleware: request metrics, the request-body bound, API keys."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterable

from pydantic import SecretStr
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.access import CALLER, FULL, NOBODY, Access, ApiKey
from service.errors import PayloadTooLarge, error_body
from service.metrics import REQUEST_ADAPTER, Metrics, RequestAdapter


class MetricsMiddleware:
    """Counts requests and latency by route template (never the raw path) and status, and
    tells the client the service's own time to its answer (``Server-Timing: app;dur=MS``):
    a client's latency minus that is time spent in the network, the kernel's accept
    queue or the client itself."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        adapter = RequestAdapter()  # the registry names the adapter the request resolved
        token = REQUEST_ADAPTER.set(adapter)

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                took_ms = (time.perf_counter() - started) * 1000
                timing = (b"server-timing", f"app;dur={took_ms:.1f}".encode())
                message = {**message, "headers": [*message.get("headers", ()), timing]}
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            REQUEST_ADAPTER.reset(token)
            took = time.perf_counter() - started
            route = scope.get("route")
            name = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(name, str(status)).inc()
            self.metrics.latency.labels(name).observe(took)
            if adapter.label is not None:
                self.metrics.adapter_answered(adapter.label, status, took)


class ReplicaHeaderMiddleware:
    """Names the replica that answered in every HTTP response (``X-Promptswap-Replica``):
    behind a load balancer this is how clients, logs and tests see where a request went."""

    def __init__(self, app: ASGIApp, replica_id: str) -> None:
        self.app = app
        self.header = (b"x-promptswap-replica", replica_id.encode("ascii"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            await send(message)

        await self.app(scope, receive, send_wrapper)


class BodyTooLarge(PayloadTooLarge):
    """Raised from ``receive`` mid-body; the app's ApiError handler answers it."""


class BodyLimitMiddleware:
    """Answers 413 for a body over its bound: at once from Content-Length, else when
    the streamed bytes pass the bound (the route's body read then fails). Paths under
    ``large_prefix`` (adapter uploads) get ``large_max_bytes``. Bodies of ``exempt_type``
    pass unbounded: a front end's rows, whose public body that front end bounded already
    (their size is the model's input size times the rows)."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        large_prefix: str = "",
        large_max_bytes: int = 0,
        exempt_type: str | None = None,
    ) -> None:
        self.app = app
        self.default_max = max_bytes
        self.large_prefix = large_prefix
        self.large_max = large_max_bytes
        self.exempt_type = exempt_type.encode() if exempt_type else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", ()))
        if self.exempt_type is not None and headers.get(b"content-type") == self.exempt_type:
            await self.app(scope, receive, send)
            return
        large = bool(self.large_prefix) and scope["path"].startswith(self.large_prefix)
        max_bytes = self.large_max if large else self.default_max
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            await self._reject(send, max_bytes)
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > max_bytes:
                    raise BodyTooLarge(f"request body is over {max_bytes} bytes")
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reject(send, max_bytes)

    @staticmethod
    async def _reject(send: Send, max_bytes: int) -> None:
        message = f"request body is over {max_bytes} bytes"
        await _send_json(send, 413, error_body("payload_too_large", message), [(b"connection", b"close")])


async def _send_json(
    send: Send, status: int, body: dict, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


class ApiKeyMiddleware:
    """Refuses requests without a valid API key (401) on every path except the open ones
    and ``skip_prefix`` (the admin API, which checks its own rights), and sets the caller's
    rights (``access.CALLER``) for the request: a key's scopes, or every right for the
    admin token.

    A key arrives as ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``. Keys are
    compared as SHA-256 digests with ``hmac.compare_digest`` against every configured key
    (no early exit), so the time taken says nothing about how much of a key matched, nor
    which key it was.
    """

    def __init__(
        self,
        app: ASGIApp,
        keys: Iterable[ApiKey],
        admin_token: SecretStr | None = None,
        open_paths: Iterable[str] = ("/healthz", "/readyz", "/metrics"),
        skip_prefix: str = "/v1/admin/",
    ) -> None:
        self.app = app
        self.keys = [(k.digest, k.access) for k in keys]
        if admin_token is not None:
            self.keys.append((hashlib.sha256(admin_token.get_secret_value().encode()).digest(), FULL))
        self.open_paths = frozenset(open_paths)
        self.skip_prefix = skip_prefix

    def _match(self, given: bytes) -> Access | None:
        digest = hashlib.sha256(given).digest()
        found = None
        for expected, access in self.keys:
            if hmac.compare_digest(digest, expected):
                found = access  # no break: every key is compared
        return found

    def access_of(self, scope: Scope) -> Access | None:
        """The rights of the offered credentials, None when none is valid."""
        offered: list[bytes] = []
        for name, value in scope.get("headers", ()):
            if name == b"x-api-key":
                offered.append(value.strip())
            elif name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    offered.append(credentials.strip())
        # Every offered key is checked, valid or not, so timing does not depend on which.
        matches = [self._match(key) for key in offered if key]
        valid = [a for a in matches if a is not None]
        return next((a for a in valid if a.full), valid[0] if valid else None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        access = self.access_of(scope)
        if access is not None or path in self.open_paths or path.startswith(self.skip_prefix):
            token = CALLER.set(access or NOBODY)
            try:
                await self.app(scope, receive, send)
            finally:
                CALLER.reset(token)
            return
        await _send_json(
            send,
            401,
            error_body(
                "unauthorized",
                "missing or invalid API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
            ),
            [(b"www-authenticate", b"Bearer")],
        )
