"""The playground over HTTP: served by the service, self-contained, open without a key, removable."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from service.ui.routes import ASSETS, STATIC
from tests.conftest import running_app

HOOKS = ("image", "labels", "adapter", "classify", "answer", "api-key", "results", "adapters")


class Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if values.get("id"):
            self.ids.add(values["id"] or "")
        for name in ("src", "href"):
            if values.get(name):
                self.refs.append(values[name] or "")


async def test_page_and_assets_are_served_with_a_same_origin_policy(client):
    response = await client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    page = Collector()
    page.feed(response.text)
    assert set(HOOKS) <= page.ids
    assert page.refs and all(ref.startswith("/ui/") for ref in page.refs), page.refs
    for name, media_type in ASSETS.items():
        asset = await client.get(f"/ui/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(media_type)
        assert asset.content == (STATIC / name).read_bytes()
    missing = await client.get("/ui/../settings.py")
    assert missing.status_code == 404
    assert (await client.get("/ui/index.html")).status_code == 404  # only the listed assets


def test_nothing_is_loaded_from_outside_the_service():
    """Air-gapped hosts: no URL with a host anywhere in the page, script or style."""
    for path in STATIC.iterdir():
        text = path.read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), path.name
        assert "@import" not in text and "url(" not in text, path.name


def test_the_script_never_touches_the_admin_api():
    script = (STATIC / "app.js").read_text()
    assert "/v1/admin" not in script and "admin" not in script.lower().replace("no admin token", "")
    called = set(re.findall(r"""["'`](/v1/[a-z/]+)""", script))
    assert called == {"/v1/models", "/v1/adapters", "/v1/classify", "/v1/chat"}, called


async def test_ui_off_removes_the_page(make_settings):
    async with running_app(make_settings(ui="off")) as (client, _):
        assert (await client.get("/")).status_code == 404
        assert (await client.get("/ui/app.js")).status_code == 404
        assert (await client.get("/healthz")).status_code == 200


async def test_with_api_keys_the_page_is_open_and_the_api_is_not(make_settings, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("key-for-the-page-test\n")
    async with running_app(make_settings(api_keys_file=keys)) as (client, _):
        assert (await client.get("/")).status_code == 200
        assert (await client.get("/ui/app.js")).status_code == 200
        assert (await client.get("/ui/nothing")).status_code == 401  # only the page's own files
        assert (await client.get("/v1/models")).status_code == 401
        ok = await client.get("/v1/models", headers={"Authorization": "Bearer key-for-the-page-test"})
        assert ok.status_code == 200
    async with running_app(make_settings(api_keys_file=keys, ui="off")) as (client, _):
        assert (await client.get("/")).status_code == 401
