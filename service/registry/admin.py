"""Adapters: upload, alias, delete (admin, bearer token) and list (public)."""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from service.access import CALLER, FULL, NOBODY, Access, Action, caller_may_see
from service.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    InsufficientStorage,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    Unprocessable,
)
from service.http.deps import RegistryDep, RuntimeDep
from service.http.schemas import ErrorBody
from service.http.strict import check_form
from service.registry.adapter_registry import parse_ref
from service.registry.store import NoSuchVersion, StoreFull, VersionAliased, check_alias

router = APIRouter()


async def require_admin(runtime: RuntimeDep, authorization: Annotated[str | None, Header()] = None) -> Access:
    """The admin token's full rights, or an API key's admin scopes (checked per adapter name
    by each route); 403 for a key without admin scopes, 401 for anything else."""
    token = runtime.settings.admin_token
    caller = CALLER.get()  # set by the API-key middleware when keys are on
    if token is None and caller is None:  # no token and no API keys that could administer
        raise NotFound("the admin API is off: no admin token is configured")
    scheme, _, given = (authorization or "").partition(" ")
    if token is not None and scheme.lower() == "bearer":
        if hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
            return FULL
    if caller is None or caller is NOBODY:
        raise Unauthorized()
    if not caller.administers:
        raise Forbidden("this API key may not administer adapters")
    return caller


def check_admin(access: Access, action: Action, name: str) -> None:
    """A name outside what the caller may see is absent to it (404); one it may see but not
    administer this way is a 403 naming only that name."""
    if access.may(action, name):
        return
    if action != "upload" and not access.may_see(name):
        raise NotFound(f"adapter {name!r} not found")
    raise Forbidden(f"this API key may not {action} adapter {name!r}")


AdminAccess = Annotated[Access, Depends(require_admin)]
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 422, 503, 507)
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
                        "force": {
                            "type": "boolean",
                            "description": "store an adapter made for other weights of the same shapes",
                        },
                    },
                }
            }
        },
    }
}


@router.post(
    "/v1/admin/adapters",
    status_code=201,
    responses=ERRORS,
    openapi_extra=UPLOAD_BODY,
    tags=["admin"],
)
async def upload_adapter(
    request: Request, access: AdminAccess, registry: RegistryDep, runtime: RuntimeDep
) -> JSONResponse:
    """Upload an adapter file (multipart field ``file``); stored as the name's next version
    (201). When a version of that name already holds the same tensors, nothing is stored and
    the answer is that version (200).

    The optional field ``name`` overrides the manifest's name. An adapter made for another
    checkpoint of the same shapes is refused (409 naming "weights") unless ``force=true``,
    which its manifest then records. A refused upload leaves the store exactly as it was.
    """
    limit = runtime.settings.max_adapter_bytes
    try:
        form = await request.form(max_files=1, max_fields=4, max_part_size=4096)
    except HTTPException as exc:
        raise BadRequest(f"malformed multipart body: {exc.detail}") from None
    check_form(form, ("file", "name", "force"))
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise Unprocessable("file: a file field named 'file' is required")
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"adapter file is over {limit} bytes")
    name = form.get("name")
    name = name if isinstance(name, str) and name else None
    force = form.get("force", "false")
    if force not in ("true", "false"):
        raise Unprocessable("force: 'true' or 'false'")
    loop = asyncio.get_running_loop()
    adapter = await loop.run_in_executor(
        runtime.decode_pool, registry.parse_upload, data, name, force == "true"
    )
    check_admin(access, "upload", adapter.name)  # before the store is read: nothing leaks
    try:
        stored, manifest, created = await loop.run_in_executor(
            runtime.decode_pool, registry.store_adapter, adapter
        )
    except StoreFull:
        raise InsufficientStorage("the adapter store is out of space; nothing was stored") from None
    return JSONResponse(
        {
            "name": stored.name,
            "version": stored.version,
            "key": stored.key,
            "size_bytes": stored.size,
            "created": created,
            "manifest": json.loads(manifest.to_json()),
        },
        status_code=201 if created else 200,
        headers={"Location": f"/v1/adapters/{stored.name}"},
    )


@router.delete("/v1/admin/adapters/{ref}", responses=ERRORS, tags=["admin"])
async def delete_adapter(
    ref: str, access: AdminAccess, registry: RegistryDep, runtime: RuntimeDep
) -> dict[str, Any]:
    """Delete ``name`` (every version) or ``name@version``. Requests already admitted
    finish on the version they hold. A version an alias points at is not deleted (409):
    move or remove the alias first."""
    name, version = parse_ref(ref)
    check_admin(access, "delete", name)
    if isinstance(version, str):
        raise Unprocessable(
            f"delete {name!r} or {name}@VERSION; to remove the alias, "
            f"DELETE /v1/admin/adapters/{name}/aliases/{version}"
        )
    loop = asyncio.get_running_loop()
    try:
        removed = await loop.run_in_executor(runtime.decode_pool, registry.store.delete, name, version)
    except VersionAliased as exc:
        raise Conflict(f"adapter {ref!r} was not deleted: {exc}") from None
    if not removed:
        raise NotFound(f"adapter {ref!r} not found")
    registry.forget(removed)
    return {"deleted": [v.key for v in removed]}


class AliasTarget(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "1" is not a version
    version: int = Field(ge=1, lt=10**9, description="The version the alias points at.")


def _alias_of(name: str, alias: str) -> tuple[str, str]:
    parsed, selector = parse_ref(name)
    if selector is not None:
        raise NotFound(f"adapter {name!r} not found: name the adapter without '@'")
    try:
        return parsed, check_alias(alias)
    except ValueError as exc:
        raise Unprocessable(str(exc)) from None


@router.put("/v1/admin/adapters/{name}/aliases/{alias}", responses=ERRORS, tags=["admin"])
async def set_alias(
    name: str,
    alias: str,
    target: AliasTarget,
    access: AdminAccess,
    registry: RegistryDep,
    runtime: RuntimeDep,
) -> dict[str, Any]:
    """Point ``name@alias`` at a stored version, atomically: every replica sharing the store
    resolves it to the new version from its next request; requests already admitted finish
    on the version they resolved. The alias ``default``, when set, is what ``name`` means."""
    name, alias = _alias_of(name, alias)
    check_admin(access, "alias", name)
    loop = asyncio.get_running_loop()
    try:
        previous = await loop.run_in_executor(
            runtime.decode_pool, registry.store.set_alias, name, alias, target.version
        )
    except NoSuchVersion:
        raise NotFound(f"adapter {name}@{target.version} not found: upload it first") from None
    except StoreFull:
        raise InsufficientStorage("the adapter store is out of space; the alias is unchanged") from None
    return {"name": name, "alias": alias, "version": target.version, "previous": previous}


@router.delete("/v1/admin/adapters/{name}/aliases/{alias}", responses=ERRORS, tags=["admin"])
async def delete_alias(
    name: str, alias: str, access: AdminAccess, registry: RegistryDep, runtime: RuntimeDep
) -> dict[str, Any]:
    """Remove an alias (the versions stay). Without ``default``, ``name`` means ``latest``."""
    name, alias = _alias_of(name, alias)
    check_admin(access, "alias", name)
    loop = asyncio.get_running_loop()
    previous = await loop.run_in_executor(runtime.decode_pool, registry.store.delete_alias, name, alias)
    if previous is None:
        raise NotFound(f"alias {name}@{alias} not found")
    return {"name": name, "alias": alias, "deleted": True, "previous": previous}


@router.get("/v1/adapters", tags=["adapters"])
async def list_adapters(registry: RegistryDep, runtime: RuntimeDep) -> dict[str, Any]:
    """Every stored adapter with its versions, sizes and whether each is loaded."""
    loop = asyncio.get_running_loop()
    described = await loop.run_in_executor(runtime.decode_pool, registry.describe_all)
    return {"adapters": [d for d in described if caller_may_see(d["name"])]}


@router.get("/v1/adapters/{name}", responses={404: {"model": ErrorBody}}, tags=["adapters"])
async def get_adapter(name: str, registry: RegistryDep, runtime: RuntimeDep) -> dict[str, Any]:
    """One adapter: versions, aliases, method, sizes, loaded or not."""
    parsed, _ = parse_ref(name)
    if not caller_may_see(parsed):
        raise NotFound(f"adapter {name!r} not found")
    loop = asyncio.get_running_loop()
    described = await loop.run_in_executor(runtime.decode_pool, registry.describe, parsed)
    if described is None:
        raise NotFound(f"adapter {name!r} not found")
    return described
