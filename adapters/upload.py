"""Upload an adapter file to a running service's admin API.

Async so that tests can hand in an ``httpx.AsyncClient`` bound to the in-process app
(``ASGITransport``); the CLI runs it with ``asyncio.run``. The token goes only into
the ``Authorization`` header: never into a message, an exception or a log line.
"""

from __future__ import annotations

import os
from typing import Any

import httpx

from adapters.errors import AdapterError

TOKEN_ENV = "PROMPTSWAP_ADMIN_TOKEN"
TIMEOUT_S = 60.0


class UploadError(AdapterError):
    """The service refused the upload or could not be reached."""

    code = "upload_failed"


def resolve_token(token: str | None) -> str:
    token = token or os.environ.get(TOKEN_ENV)
    if not token:
        raise UploadError(f"no admin token: pass --token or set {TOKEN_ENV}")
    return token


def new_client() -> httpx.AsyncClient:
    """The client a command uses when none is given (tests point it at an in-process app)."""
    return httpx.AsyncClient(timeout=TIMEOUT_S)


async def upload_adapter(
    data: bytes,
    url: str,
    token: str,
    *,
    filename: str = "adapter.safetensors",
    name: str | None = None,
    client: httpx.AsyncClient | None = None,
) -> dict[str, Any]:
    """POST the file as multipart field ``file`` to ``URL/v1/admin/adapters``; the service's answer."""
    endpoint = url.rstrip("/") + "/v1/admin/adapters"
    files = {"file": (filename, data, "application/octet-stream")}
    form = {"name": name} if name else None
    headers = {"Authorization": f"Bearer {token}"}
    try:
        if client is None:
            async with new_client() as own:
                response = await own.post(endpoint, files=files, data=form, headers=headers)
        else:
            response = await client.post(endpoint, files=files, data=form, headers=headers)
    except httpx.HTTPError as e:  # the message names the URL, never the headers
        raise UploadError(f"cannot reach {endpoint}: {type(e).__name__}: {e}") from None
    if response.status_code != 201:
        raise UploadError(
            f"upload to {endpoint} failed with HTTP {response.status_code}: {_error_text(response)}"
        )
    return response.json()


def _error_text(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        return f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return response.text[:500]
