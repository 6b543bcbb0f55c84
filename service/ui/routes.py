"""The playground page at ``/`` and its assets under ``/ui/``.

Plain files, no build step, nothing fetched from outside the service: the Content-Security
Policy allows this origin only, so the page works on an air-gapped host and a page that
tried to load a CDN would fail in the browser, not silently work online. The page holds no
secret and calls only the public API (with the caller's API key when keys are on), so it is
served without a key; ``--ui off`` leaves it out.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from service.errors import NotFound

STATIC = Path(__file__).parent / "static"
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
# What the API-key middleware lets through: the page and its assets, nothing else.
PUBLIC_PATHS = ("/", "/ui", "/ui/", *(f"/ui/{name}" for name in ASSETS))
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=SECURITY_HEADERS)


@router.get("/ui")
@router.get("/ui/")
async def ui_root() -> RedirectResponse:
    return RedirectResponse("/")


@router.get("/ui/{name}")
async def asset(name: str) -> FileResponse:
    media_type = ASSETS.get(name)
    if media_type is None:  # a fixed list: no path from the request reaches the file system
        raise NotFound(f"no playground asset {name!r}")
    return FileResponse(STATIC / name, media_type=media_type, headers=SECURITY_HEADERS)
