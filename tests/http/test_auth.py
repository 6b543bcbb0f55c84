"""Admin token and public API keys: who gets in, what everyone else gets (401 JSON),
and that no secret ever reaches a log line or an answer."""

from __future__ import annotations

import base64
import hashlib
import logging
from pathlib import Path

import pytest

from fixtures.adapters import adapter_bytes
from service.access import load_api_keys
from service.cli import main as cli_main
from service.http import middleware
from service.main import create_app
from tests.classify.test_errors import assert_error
from tests.conftest import encode, make_image, running_app
from tests.registry.test_admin_api import TOKEN, upload

KEYS = ("key-alpha-0123456789", "key-beta-9876543210")
KEYS_FILE = f"""# promptswap API keys
{KEYS[0]}

   {KEYS[1]}   
# key-commented-out
"""


def image_form(labels=("cat", "dog")) -> dict:
    return {"files": {"image": ("i.png", encode(make_image(0)))}, "data": {"labels": list(labels)}}


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.txt"
    path.write_text(KEYS_FILE)
    return path


# ------------------------------------------------------------------ admin token


BAD_ADMIN_HEADERS = [
    {},
    {"Authorization": ""},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
    {"Authorization": "Bearer wrong"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Bearer {TOKEN[:-1]}"},
    {"Authorization": f"Basic {base64.b64encode(TOKEN.encode()).decode()}"},
    {"Authorization": TOKEN},
    {"X-Admin-Token": TOKEN},
]


async def test_admin_refuses_missing_and_wrong_tokens_and_never_echoes_them(
    make_settings, tiny_clip_dir, caplog
):
    caplog.set_level(logging.DEBUG)
    data = adapter_bytes(tiny_clip_dir, "pets")
    async with running_app(make_settings(admin_token=TOKEN)) as (client, _):
        for headers in BAD_ADMIN_HEADERS:
            for response in (
                await upload(client, data, headers=headers),
                await client.delete("/v1/admin/adapters/pets", headers=headers),
            ):
                assert_error(response, 401, "unauthorized")
                assert response.headers["www-authenticate"] == "Bearer"
                assert TOKEN not in response.text and TOKEN not in str(response.headers)
        good = {"Authorization": f"Bearer {TOKEN}"}
        ok = await upload(client, data, headers=good)
        assert ok.status_code == 201, ok.text
        assert (await upload(client, b"not an adapter", headers=good)).status_code == 400
        assert (await client.delete("/v1/admin/adapters/nope", headers=good)).status_code == 404
        assert (await client.delete("/v1/admin/adapters/pets", headers=good)).status_code == 200
        for response in (ok,):
            assert TOKEN not in response.text
        metrics = (await client.get("/metrics")).text
        assert TOKEN not in metrics
    assert caplog.records, "nothing was logged: the check below would prove nothing"
    assert TOKEN not in caplog.text


@pytest.mark.parametrize("token", [None, "", "   "], ids=["unset", "empty", "blank"])
async def test_admin_is_off_without_a_configured_token(make_settings, tiny_clip_dir, token):
    async with running_app(make_settings(admin_token=token)) as (client, app):
        assert app.state.settings.admin_token is None
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer x"}):
            assert_error(await upload(client, adapter_bytes(tiny_clip_dir, "p"), headers=headers), 404)
            assert_error(await client.delete("/v1/admin/adapters/p", headers=headers), 404)


# ------------------------------------------------------------------ API keys


async def test_api_keys_are_off_by_default(client):
    assert (await client.post("/v1/classify", **image_form())).status_code == 200
    assert (await client.get("/v1/models")).status_code == 200


async def test_api_keys_guard_the_public_routes(make_settings, keys_file, caplog):
    caplog.set_level(logging.DEBUG)
    async with running_app(make_settings(api_keys_file=keys_file)) as (client, _):
        guarded = [
            ("POST", "/v1/classify", image_form()),
            ("POST", "/v1/chat", {"json": {"image": "aGk=", "instruction": "hi"}}),
            ("POST", "/v1/chat/completions", {"json": {"model": "m", "messages": []}}),
            ("GET", "/v1/models", {}),
            ("GET", "/v1/adapters", {}),
            ("GET", "/v1/adapters/pets", {}),
            ("GET", "/openapi.json", {}),
            ("GET", "/docs", {}),
            ("GET", "/nowhere", {}),
        ]
        refused = [
            {},
            {"Authorization": "Bearer "},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Bearer {KEYS[0]}x"},
            {"Authorization": f"Basic {KEYS[0]}"},
            {"Authorization": KEYS[0]},
            {"X-API-Key": ""},
            {"X-API-Key": KEYS[0][:-1]},
            {"X-API-Key": "# key-commented-out"},
            {"X-API-Key": "key-commented-out"},
            {"X-API-Key": "# promptswap API keys"},
        ]
        for method, path, kwargs in guarded:
            for headers in refused:
                response = await client.request(method, path, headers=headers, **kwargs)
                error = assert_error(response, 401, "unauthorized")
                assert "API key" in error["message"]
                assert response.headers["www-authenticate"] == "Bearer"
                assert all(k not in response.text for k in KEYS)
        for headers in (
            {"Authorization": f"Bearer {KEYS[0]}"},
            {"authorization": f"bearer {KEYS[1]}"},
            {"X-API-Key": KEYS[0]},
            {"x-api-key": f"  {KEYS[1]} "},
            {"X-API-Key": "wrong", "Authorization": f"Bearer {KEYS[1]}"},
        ):
            response = await client.post("/v1/classify", headers=headers, **image_form())
            assert response.status_code == 200, (headers, response.text)
            assert (await client.get("/v1/models", headers=headers)).status_code == 200
        for path in ("/healthz", "/readyz", "/metrics"):  # open for probes and scrapers
            assert (await client.get(path)).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert 'status="401"' in metrics  # refusals are counted
        assert all(k not in metrics for k in KEYS)
    assert all(k not in caplog.text for k in KEYS)


async def test_admin_routes_keep_their_own_token_when_api_keys_are_on(
    make_settings, keys_file, tiny_clip_dir
):
    settings = make_settings(api_keys_file=keys_file, admin_token=TOKEN)
    async with running_app(settings) as (client, _):
        data = adapter_bytes(tiny_clip_dir, "pets")
        assert (await upload(client, data)).status_code == 201  # admin token, no API key
        # a public key is known but holds no admin scope (see tests/http/test_scopes.py)
        assert_error(await upload(client, data, headers={"Authorization": f"Bearer {KEYS[0]}"}), 403)
        assert_error(await upload(client, data, headers={"Authorization": "Bearer nope"}), 401)


async def test_the_401_comes_before_the_body_is_read(make_settings, keys_file):
    read = []

    async with running_app(make_settings(api_keys_file=keys_file, max_body_bytes=4096)) as (client, _):

        async def body():
            read.append(1)
            yield b"x" * 100_000

        response = await client.post(
            "/v1/classify", content=body(), headers={"content-type": "application/json"}
        )
        assert_error(response, 401)  # not 413: the key is checked first
        assert read == [], "the body was read for a request without a key"


def test_every_key_is_compared_in_constant_time(monkeypatch, keys_file):
    calls: list[tuple[bytes, bytes]] = []
    real = middleware.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(middleware.hmac, "compare_digest", spy)
    guard = middleware.ApiKeyMiddleware(app=None, keys=load_api_keys(keys_file))
    for offered, expected in ((KEYS[0], True), (KEYS[1], True), ("nope", False)):
        calls.clear()
        assert (guard.access_of({"headers": [(b"x-api-key", offered.encode())]}) is not None) is expected
        # no early exit: every configured key is compared, as fixed-length digests
        assert len(calls) == len(KEYS) and all(len(a) == len(b) == 32 for a, b in calls)


def test_keys_file_parsing(tmp_path, keys_file):
    assert [k.digest for k in load_api_keys(keys_file)] == [hashlib.sha256(k.encode()).digest() for k in KEYS]
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="holds no key"):
        load_api_keys(empty)
    with pytest.raises(ValueError, match="cannot read"):
        load_api_keys(tmp_path / "missing.txt")


def test_keys_file_is_read_once_at_start_up(make_settings, keys_file):
    app = create_app(make_settings(api_keys_file=keys_file))
    keys_file.write_text("another-key\n")  # later edits are not seen: a restart reads the file
    guard = app.middleware_stack or app.build_middleware_stack()
    while not isinstance(guard, middleware.ApiKeyMiddleware):
        guard = guard.app
    assert guard.access_of({"headers": [(b"x-api-key", KEYS[0].encode())]}) is not None
    assert guard.access_of({"headers": [(b"x-api-key", b"another-key")]}) is None


def test_cli_refuses_a_missing_or_empty_keys_file(tmp_path, tiny_clip_dir, capsys):
    (tmp_path / "empty").write_text("\n# nothing\n")
    for path in (tmp_path / "missing", tmp_path / "empty"):
        code = cli_main(
            ["serve", "--clip-model", str(tiny_clip_dir), "--device", "cpu", "--api-keys-file", str(path)]
        )
        assert code == 2
        assert str(path) in capsys.readouterr().err
