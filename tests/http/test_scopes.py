"""Scoped API keys: which adapters a key may use and administer; a foreign adapter is absent
to it (404, like a name nobody stored), an admin action it may not take is a 403 naming only
what it may see; the admin token keeps every right; no key reaches a log line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fixtures.adapters import adapter_bytes
from service.access import load_api_keys
from tests.classify.test_errors import assert_error
from tests.conftest import encode, make_image, running_app
from tests.registry.test_admin_api import TOKEN, upload

TEAM_A, VIEWER, ZOO, PLAIN = "k-team-a-0f9e8d", "k-viewer-1a2b3c", "k-zoo-4d5e6f", "k-plain-7a8b9c"
SCOPED_KEYS = f"""# key  scopes
{TEAM_A}  use=pets admin=pets-*   # team A
{VIEWER}  use=pets-*
{ZOO}     use=zoo-* upload=zoo-*
{PLAIN}
"""
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def key(k: str) -> dict[str, str]:
    return {"X-API-Key": k}


@pytest.fixture
def scoped_keys(tmp_path: Path) -> Path:
    path = tmp_path / "keys.txt"
    path.write_text(SCOPED_KEYS)
    return path


async def test_keys_see_use_and_administer_only_their_scope(
    make_settings, scoped_keys, tiny_clip_dir, caplog
):
    caplog.set_level(logging.DEBUG)
    settings = make_settings(api_keys_file=scoped_keys, admin_token=TOKEN)
    async with running_app(settings) as (client, _):
        for name in ("pets", "pets-x", "zoo-1"):
            assert (
                await upload(client, adapter_bytes(tiny_clip_dir, name), headers=ADMIN)
            ).status_code == 201

        async def status(k: str, ref: str) -> int:
            return (await client.post("/v1/classify", **_form(ref), headers=key(k))).status_code

        # use: its globs plus what it administers; the admin token uses everything
        assert [await status(TEAM_A, r) for r in ("pets", "pets-x", "zoo-1")] == [200, 200, 404]
        assert [await status(VIEWER, r) for r in ("pets", "pets-x", "zoo-1")] == [404, 200, 404]
        assert [await status(PLAIN, r) for r in ("pets", "pets-x", "zoo-1")] == [200, 200, 200]
        assert (await classify_as(client, ADMIN, "zoo-1")).status_code == 200

        # a foreign adapter answers exactly as one nobody stored
        foreign = await client.post("/v1/classify", **_form("zoo-1"), headers=key(TEAM_A))
        absent = await client.post("/v1/classify", **_form("zoo-9"), headers=key(TEAM_A))
        assert foreign.status_code == absent.status_code == 404
        assert foreign.json()["error"]["message"].replace("zoo-1", "X") == absent.json()["error"][
            "message"
        ].replace("zoo-9", "X")
        listed = (await client.get("/v1/adapters", headers=key(TEAM_A))).json()["adapters"]
        assert [a["name"] for a in listed] == ["pets", "pets-x"]
        assert (await client.get("/v1/adapters/zoo-1", headers=key(TEAM_A))).status_code == 404
        models = {m["id"] for m in (await client.get("/v1/models", headers=key(TEAM_A))).json()["data"]}
        assert "pets-x" in models and not any(m.startswith("zoo") for m in models)
        for path in ("/v1/adapters", "/v1/models"):
            assert "zoo" not in (await client.get(path, headers=key(VIEWER))).text

        # administer: upload, alias, delete inside the scope
        mine = await upload(client, adapter_bytes(tiny_clip_dir, "pets-y"), headers=key(TEAM_A))
        assert mine.status_code == 201, mine.text
        moved = await client.put(
            "/v1/admin/adapters/pets-x/aliases/prod", json={"version": 1}, headers=key(TEAM_A)
        )
        assert moved.status_code == 200, moved.text
        assert (await client.delete("/v1/admin/adapters/pets-y", headers=key(TEAM_A))).status_code == 200

        # outside it: 403 naming only the name it gave, or 404 for what it may not see
        for name in ("pets", "zoo-1", "zoo-new"):  # may use "pets", not upload it
            refused = assert_error(
                await upload(client, adapter_bytes(tiny_clip_dir, name), headers=key(TEAM_A)),
                403,
                "forbidden",
            )
            assert refused["message"] == f"this API key may not upload adapter {name!r}"
        assert_error(await client.delete("/v1/admin/adapters/pets", headers=key(TEAM_A)), 403)
        assert_error(await client.delete("/v1/admin/adapters/zoo-1", headers=key(TEAM_A)), 404)
        hidden = await client.put(
            "/v1/admin/adapters/zoo-1/aliases/prod", json={"version": 1}, headers=key(TEAM_A)
        )
        assert_error(hidden, 404)
        assert (await classify_as(client, ADMIN, "zoo-1")).status_code == 200  # nothing was touched

        # upload-only scope: uploads, cannot alias or delete
        assert (
            await upload(client, adapter_bytes(tiny_clip_dir, "zoo-2"), headers=key(ZOO))
        ).status_code == 201
        assert_error(await client.delete("/v1/admin/adapters/zoo-2", headers=key(ZOO)), 403)
        # keys without admin scopes are known (403), unknown credentials are not (401)
        for k in (VIEWER, PLAIN):
            assert_error(await upload(client, adapter_bytes(tiny_clip_dir, "pets-z"), headers=key(k)), 403)
        assert_error(await upload(client, adapter_bytes(tiny_clip_dir, "pets-z"), headers=key("nope")), 401)
        # the admin token administers everything
        assert (await client.delete("/v1/admin/adapters/zoo-2", headers=ADMIN)).status_code == 200
    for k in (TEAM_A, VIEWER, ZOO, PLAIN, TOKEN):
        assert k not in caplog.text


def _form(ref: str) -> dict:
    return {
        "files": {"image": ("i.png", encode(make_image(0)))},
        "data": {"labels": ["a", "b"], "adapter": ref},
    }


async def classify_as(client, headers, ref):
    return await client.post("/v1/classify", **_form(ref), headers=headers)


def test_scopes_file_parsing(tmp_path: Path, scoped_keys: Path):
    keys = load_api_keys(scoped_keys)
    team_a, viewer, zoo, plain = (k.access for k in keys)
    assert team_a.may("use", "pets") and team_a.may("use", "pets-q") and not team_a.may("use", "pets2")
    assert team_a.may("alias", "pets-q") and not team_a.may("alias", "pets")
    assert viewer.may("use", "pets-q") and not viewer.administers
    assert zoo.may("upload", "zoo-3") and not zoo.may("delete", "zoo-3")
    assert plain.may("use", "anything") and not plain.administers
    for bad in ("k1 use", "k1 read=pets", "k1 use=Pets", "k1 use=", "k1 use=a/b", "k1\nk1"):
        path = tmp_path / "bad.txt"
        path.write_text(bad + "\n")
        with pytest.raises(ValueError) as raised:
            load_api_keys(path)
        assert "k1" not in str(raised.value).replace(str(path), "")  # never quotes a key
