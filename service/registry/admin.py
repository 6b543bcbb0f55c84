"""Adapters: upload, delete (admin, bearer token) and list (public)."""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from service.errors import (
    BadRequest,
    InsufficientStorage,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    Unprocessable,
)
from service.http.deps import RegistryDep, RuntimeDep
from service.http.schemas import ErrorBody
from service.registry.adapter_registry import parse_ref
from service.registry.store import StoreFull

router = APIRouter()


def require_admin(runtime: RuntimeDep, authorization: Annotated[str | None, Header()] = None) -> None:
    token = runtime.settings.admin_token
    if token is None:
        raise NotFound("the admin API is off: no admin token is configured")
    scheme, _, given = (authorization or "").partition(" ")
    expected = token.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
        raise Unauthorized()


AdminDep = Depends(require_admin)
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 409, 413, 422, 503, 507)
}
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9._-]{0,63}$"},
                    },
                }
            }
        },
    }
}


@router.post(
    "/v1/admin/adapters",
    status_code=201,
    dependencies=[AdminDep],
    responses=ERRORS,
    openapi_extra=UPLOAD_BODY,
    tags=["admin"],
)
async def upload_adapter(request: Request, registry: RegistryDep, runtime: RuntimeDep) -> JSONResponse:
    """Upload an adapter file (multipart field ``file``); stored as the name's next version.

    The optional field ``name`` overrides the manifest's name. A refused upload leaves
    the store exactly as it was.
    """
    limit = runtime.settings.max_adapter_bytes
    try:
        form = await request.form(max_files=1, max_fields=4, max_part_size=4096)
    except HTTPException as exc:
        raise BadRequest(f"malformed multipart body: {exc.detail}") from None
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise Unprocessable("file: a file field named 'file' is required")
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"adapter file is over {limit} bytes")
    name = form.get("name")
    name = name if isinstance(name, str) and name else None
    loop = asyncio.get_running_loop()
    adapter = await loop.run_in_executor(runtime.decode_pool, registry.parse_upload, data, name)
    try:
        stored = await loop.run_in_executor(runtime.decode_pool, registry.store_adapter, adapter)
    except StoreFull:
        raise InsufficientStorage("the adapter store is out of space; nothing was stored") from None
    manifest = json.loads(adapter.manifest.to_json())
    manifest["version"] = stored.version
    return JSONResponse(
        {
            "name": stored.name,
            "version": stored.version,
            "key": stored.key,
            "size_bytes": stored.size,
            "manifest": manifest,
        },
        status_code=201,
        headers={"Location": f"/v1/adapters/{stored.name}"},
    )


@router.delete("/v1/admin/adapters/{ref}", dependencies=[AdminDep], responses=ERRORS, tags=["admin"])
async def delete_adapter(ref: str, registry: RegistryDep, runtime: RuntimeDep) -> dict[str, Any]:
    """Delete ``name`` (every version) or ``name@version``. Requests already admitted
    finish on the version they hold."""
    name, version = parse_ref(ref)
    loop = asyncio.get_running_loop()
    removed = await loop.run_in_executor(runtime.decode_pool, registry.store.delete, name, version)
    if not removed:
        raise NotFound(f"adapter {ref!r} not found")
    registry.forget(removed)
    return {"deleted": [v.key for v in removed]}


@router.get("/v1/adapters", tags=["adapters"])
async def list_adapters(registry: RegistryDep, runtime: RuntimeDep) -> dict[str, Any]:
    """Every stored adapter with its versions, sizes and whether each is loaded."""
    loop = asyncio.get_running_loop()
    return {"adapters": await loop.run_in_executor(runtime.decode_pool, registry.describe_all)}


@router.get("/v1/adapters/{name}", responses={404: {"model": ErrorBody}}, tags=["adapters"])
async def get_adapter(name: str, registry: RegistryDep, runtime: RuntimeDep) -> dict[str, Any]:
    """One adapter: versions, method, sizes, loaded or not."""
    parsed, _ = parse_ref(name)
    loop = asyncio.get_running_loop()
    described = await loop.run_in_executor(runtime.decode_pool, registry.describe, parsed)
    if described is None:
        raise NotFound(f"adapter {name!r} not found")
    return described
