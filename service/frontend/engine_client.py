"""A front end's connection to the model's process: HTTP over its private Unix socket.

Every request a front end does not finish itself is passed through as it came (headers,
body and answer streamed both ways, so chat's server-sent events and adapter uploads
flow as they arrive); classify is sent as rows (``service.frontend.rows``). Answers,
error bodies and metrics are the model's process's own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from service.errors import Unavailable

# Per connection, not end to end (RFC 9110 7.6.1); date and server are the front end's own.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_OWN = frozenset({b"date", b"server"})


class EngineClient:
    def __init__(self, socket_path: str, retry_after_s: int) -> None:
        self.retry_after_s = retry_after_s
        self.http = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=socket_path),
            base_url="http://promptswap-model",
            # The model's process bounds every request's time itself (deadlines, chat_timeout_s).
            timeout=httpx.Timeout(None, connect=10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    async def send(
        self, request: Request, content: bytes | AsyncIterator[bytes], headers: list[tuple[bytes, bytes]]
    ) -> httpx.Response:
        """``request``'s method, path and query with ``content``; the answer's body unread.
        503 while the model's process does not take connections (starting, restarting)."""
        query = request.scope.get("query_string", b"")
        url = httpx.URL(path=request.scope["path"], query=query or None)
        upstream = self.http.build_request(request.method, url, headers=headers, content=content)
        try:
            return await self.http.send(upstream, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as exc:
            raise Unavailable(
                f"the model's process does not answer ({type(exc).__name__}); retry shortly",
                retry_after_s=self.retry_after_s,
            ) from None

    async def pass_through(self, request: Request) -> Response:
        """``request`` as it came, its answer streamed back as it comes."""
        headers = [(k, v) for k, v in request.headers.raw if k not in _HOP_BY_HOP]
        has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
        upstream = await self.send(request, request.stream() if has_body else b"", headers)

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                await upstream.aclose()

        response = StreamingResponse(
            body(), status_code=upstream.status_code, background=BackgroundTask(upstream.aclose)
        )
        response.raw_headers = answer_headers(upstream)
        return response

    async def rows(self, request: Request, body: bytes, content_type: str) -> Response:
        """A front end's rows for ``request``, and the model's process's answer."""
        keep = (b"content-type", b"content-length")
        headers = [(k, v) for k, v in request.headers.raw if k not in _HOP_BY_HOP and k not in keep]
        headers += [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
        upstream = await self.send(request, body, headers)
        try:
            content = await upstream.aread()
        finally:
            await upstream.aclose()
        response = Response(content, status_code=upstream.status_code)
        response.raw_headers = answer_headers(upstream)
        return response


def answer_headers(upstream: httpx.Response) -> list[tuple[bytes, bytes]]:
    pairs = ((k.lower(), v) for k, v in upstream.headers.raw)  # ASGI header names are lower case
    return [(k, v) for k, v in pairs if k not in _HOP_BY_HOP and k not in _OWN]
