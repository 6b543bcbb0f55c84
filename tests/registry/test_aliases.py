"""Aliases and idempotent uploads through HTTP: try a version, promote it, roll back."""

from __future__ import annotations

import base64

import pytest
from transformers import CLIPConfig

from adapters.format import dump
from adapters.maple import clip_fingerprint
from fixtures.adapters import adapter_bytes, random_folded
from tests.chat.test_chat_adapters import chat, m2pt_bytes
from tests.conftest import encode, make_image, running_app
from tests.llava_fixtures import save_tiny_llava
from tests.registry.test_admin_api import AUTH, TOKEN, classify, logits_of, store_snapshot, upload


@pytest.fixture
def admin_settings(make_settings):
    return lambda **kw: make_settings(admin_token=TOKEN, **kw)


@pytest.fixture(params=["directory", "bucket"])
def store_settings(request, make_settings):
    """Admin settings on either store: aliases behave the same on a bucket (SeaweedFS)."""
    store = {"adapter_store": request.getfixturevalue("s3_url")} if request.param == "bucket" else {}
    return lambda **kw: make_settings(admin_token=TOKEN, **store, **kw)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("llava-aliases"))


async def put_alias(client, name: str, alias: str, version, headers=AUTH):
    return await client.put(
        f"/v1/admin/adapters/{name}/aliases/{alias}", json={"version": version}, headers=headers
    )


async def used(client, ref: str) -> str:
    response = await classify(client, 0, ["cat", "dog"], ref)
    assert response.status_code == 200, response.text
    return response.json()["adapter"]


async def test_aliases_promote_and_roll_back(store_settings, tiny_clip_dir):
    async with running_app(store_settings()) as (client, _):
        for seed in (1, 2):
            assert (await upload(client, adapter_bytes(tiny_clip_dir, "pets", seed=seed))).status_code == 201
        assert await used(client, "pets") == "pets@2"  # no default: the plain name is latest

        # default pins what the plain name means; latest stays the highest version.
        set_default = await put_alias(client, "pets", "default", 1)
        assert set_default.status_code == 200, set_default.text
        assert set_default.json() == {"name": "pets", "alias": "default", "version": 1, "previous": None}
        assert await used(client, "pets") == "pets@1"
        assert await used(client, "pets@default") == "pets@1"
        assert await used(client, "pets@latest") == "pets@2"
        v1 = logits_of((await classify(client, 0, ["cat", "dog"], "pets@1")).json())
        assert logits_of((await classify(client, 0, ["cat", "dog"], "pets")).json()) == v1

        # try a candidate, promote it, roll back
        assert (await put_alias(client, "pets", "candidate", 2)).status_code == 200
        assert await used(client, "pets@candidate") == "pets@2"
        promoted = await put_alias(client, "pets", "default", 2)
        assert promoted.json()["previous"] == 1
        assert await used(client, "pets") == "pets@2"
        assert (await put_alias(client, "pets", "default", 1)).json()["previous"] == 2
        assert await used(client, "pets") == "pets@1"

        described = (await client.get("/v1/adapters/pets")).json()
        assert described["aliases"] == {"candidate": 2, "default": 1}
        assert (described["latest"], described["default"]) == (2, 1)
        assert [v["aliases"] for v in described["versions"]] == [["default"], ["candidate"]]
        models = {m["id"] for m in (await client.get("/v1/models")).json()["data"]}
        assert {"pets@default", "pets@candidate", "pets@latest"} <= models

        # an aliased version cannot be deleted; the refusal names the alias
        refused = await client.delete("/v1/admin/adapters/pets@1", headers=AUTH)
        assert refused.status_code == 409 and "default -> pets@1" in refused.json()["error"]["message"]
        assert (await client.delete("/v1/admin/adapters/pets", headers=AUTH)).status_code == 409
        assert await used(client, "pets@1") == "pets@1"  # nothing was deleted

        removed = await client.delete("/v1/admin/adapters/pets/aliases/default", headers=AUTH)
        assert removed.status_code == 200 and removed.json()["previous"] == 1
        assert await used(client, "pets") == "pets@2"  # back to latest
        assert (await client.delete("/v1/admin/adapters/pets@1", headers=AUTH)).status_code == 200
        gone = await client.delete("/v1/admin/adapters/pets/aliases/default", headers=AUTH)
        assert gone.status_code == 404


async def test_alias_errors_are_clear(store_settings, tiny_clip_dir):
    async with running_app(store_settings()) as (client, _):
        assert (await upload(client, adapter_bytes(tiny_clip_dir, "pets"))).status_code == 201
        for bad in ("latest", "Prod", "1st", "a" * 33, "p.rod"):
            r = await put_alias(client, "pets", bad, 1)
            assert r.status_code == 422, (bad, r.text)
            assert r.json()["error"]["code"] == "invalid_request"
        assert "reserved" in (await put_alias(client, "pets", "latest", 1)).json()["error"]["message"]
        for body in ({}, {"version": 0}, {"version": "1"}, {"version": 1, "extra": True}):
            r = await client.put("/v1/admin/adapters/pets/aliases/prod", json=body, headers=AUTH)
            assert r.status_code == 422, (body, r.text)
        missing = await put_alias(client, "pets", "prod", 7)
        assert missing.status_code == 404 and "pets@7" in missing.json()["error"]["message"]
        assert (await put_alias(client, "nobody", "prod", 1)).status_code == 404
        assert (await put_alias(client, "pets", "prod", 1, headers={})).status_code == 401
        unknown = await classify(client, 0, ["cat"], "pets@prod")
        assert unknown.status_code == 404
        assert (await classify(client, 0, ["cat"], "pets@no.such")).status_code == 404
        by_alias = await client.delete("/v1/admin/adapters/pets@prod", headers=AUTH)
        assert by_alias.status_code == 422 and "/aliases/prod" in by_alias.json()["error"]["message"]


async def test_an_admitted_request_keeps_the_version_it_resolved(admin_settings, tiny_clip_dir):
    async with running_app(admin_settings()) as (client, app):
        for seed in (1, 2):
            await upload(client, adapter_bytes(tiny_clip_dir, "pets", seed=seed))
        await put_alias(client, "pets", "prod", 1)
        registry = app.state.runtime.services.registry
        held = await registry.acquire("pets@prod", "maple")  # as a request admitted now
        try:
            assert (await put_alias(client, "pets", "prod", 2)).status_code == 200
            assert await used(client, "pets@prod") == "pets@2"  # the next request moves
            assert held.key == "pets@1"  # the held version is pinned: still loaded, still v1
            versions = (await client.get("/v1/adapters/pets")).json()["versions"]
            assert [v["loaded"] for v in versions] == [True, True]
        finally:
            registry.release(held)


async def test_identical_upload_answers_the_existing_version(admin_settings, tiny_clip_dir, tmp_path):
    async with running_app(admin_settings()) as (client, _):
        data = adapter_bytes(tiny_clip_dir, "pets", seed=1)
        first = await upload(client, data)
        assert first.status_code == 201 and first.json()["created"] is True
        before = store_snapshot(tmp_path / "adapters")
        again = await upload(client, data)
        assert again.status_code == 200, again.text
        body = again.json()
        assert (body["version"], body["created"]) == (1, False)
        assert body["manifest"] == first.json()["manifest"]
        assert store_snapshot(tmp_path / "adapters") == before  # nothing stored
        # the same tensors with another manifest (a new description) are still the same version
        config = CLIPConfig.from_pretrained(tiny_clip_dir)
        redescribed = dump(
            random_folded(config, 1), name="pets", backbone=clip_fingerprint(config), description="again"
        )
        assert (await upload(client, redescribed)).status_code == 200
        # new content: a new version; the same content under another name: that name's first
        assert (await upload(client, adapter_bytes(tiny_clip_dir, "pets", seed=2))).json()["version"] == 2
        other = await upload(client, data, name="cats")
        assert other.status_code == 201 and other.json()["key"] == "cats@1"
        # v1's content again after v2: still v1, not a v3
        assert (await upload(client, data)).json()["version"] == 1
        assert [v["version"] for v in (await client.get("/v1/adapters/pets")).json()["versions"]] == [1, 2]


async def test_chat_and_openai_model_take_aliases(make_settings, llava_dir):
    settings = make_settings(llava_model=str(llava_dir), admin_token=TOKEN)
    async with running_app(settings) as (client, app):
        for seed in (1, 2):
            up = await upload(client, m2pt_bytes(llava_dir, "vqa", seed))
            assert up.status_code == 201, up.text
        assert (await put_alias(client, "vqa", "prod", 1)).status_code == 200
        by_alias = await chat(client, 0, "vqa@prod")
        assert by_alias["adapter"] == "vqa@1"
        assert by_alias["text"] == (await chat(client, 0, "vqa@1"))["text"]
        assert by_alias["text"] != (await chat(client, 0, "vqa@2"))["text"]  # the fixture tells them apart

        image = base64.b64encode(encode(make_image(0))).decode()

        async def completion(model: str) -> str:
            content = [
                {"type": "text", "text": "describe the picture in detail"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
            ]
            body = {
                "model": model,
                "max_tokens": 10,
                "temperature": 0,
                "messages": [{"role": "user", "content": content}],
            }
            response = await client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["message"]["content"]

        assert await completion("vqa@prod") == await completion("vqa@1")
        assert (await put_alias(client, "vqa", "default", 2)).status_code == 200
        assert await completion("vqa") == await completion("vqa@2")
        rows = app.state.metrics.registry.get_sample_value(
            "promptswap_adapter_batch_rows_count", {"adapter": "vqa"}
        )
        assert rows and rows > 0  # chat decode steps count their rows per adapter
