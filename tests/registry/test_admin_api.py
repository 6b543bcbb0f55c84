"""MaPLe adapters through HTTP: upload, classify, hot swap, delete, mixed batches."""

from __future__ import annotations

import asyncio
import pickle
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, CLIPConfig, CLIPModel

from adapters.prompted_clip import encode_image, encode_text
from fixtures.adapters import adapter_bytes, nan_adapter_bytes
from fixtures.tiny_models import tiny_clip_config
from tests.conftest import encode, make_image, running_app

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def upload(client, data: bytes, headers=AUTH, **fields):
    return await client.post(
        "/v1/admin/adapters", files={"file": ("a.safetensors", data)}, data=fields, headers=headers
    )


async def classify(client, seed: int, labels, adapter: str | None = None):
    data = {"labels": labels}
    if adapter is not None:
        data["adapter"] = adapter
    response = await client.post(
        "/v1/classify", files={"image": ("i.png", encode(make_image(seed)))}, data=data
    )
    return response


def logits_of(body) -> dict[str, float]:
    return {row["label"]: row["logit"] for row in body["labels"]}


def store_snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".tmp" not in p.parts
    }


@pytest.fixture
def admin_settings(make_settings):
    return lambda **kw: make_settings(admin_token=TOKEN, **kw)


async def test_upload_classify_version_hot_swap_delete(admin_settings, tiny_clip_dir):
    async with running_app(admin_settings()) as (client, app):
        created = await upload(client, adapter_bytes(tiny_clip_dir, "pets", seed=1))
        assert created.status_code == 201, created.text
        body = created.json()
        assert (body["name"], body["version"], body["key"]) == ("pets", 1, "pets@1")
        assert body["manifest"]["method"] == "maple" and body["manifest"]["version"] == 1

        zero = (await classify(client, 0, ["cat", "dog"])).json()
        with_v1 = (await classify(client, 0, ["cat", "dog"], "pets")).json()
        assert with_v1["adapter"] == "pets@1"
        assert logits_of(with_v1) != pytest.approx(logits_of(zero), abs=1e-3)
        pinned = (await classify(client, 0, ["cat", "dog"], "pets@1")).json()
        assert logits_of(pinned) == logits_of(with_v1)

        listing = (await client.get("/v1/adapters")).json()["adapters"]
        assert [a["name"] for a in listing] == ["pets"] and listing[0]["versions"][0]["loaded"]
        one = (await client.get("/v1/adapters/pets")).json()
        assert one["method"] == "maple" and one["latest"] == 1

        # Hot swap under load: a stream of requests keeps going while v2 arrives.
        stop = asyncio.Event()
        outcomes: list[tuple[int, str | None]] = []

        async def load_stream(seed: int) -> None:
            while not stop.is_set():
                r = await classify(client, seed, ["cat", "dog"], "pets")
                outcomes.append((r.status_code, r.json().get("adapter")))

        streams = [asyncio.ensure_future(load_stream(s)) for s in range(4)]
        while len(outcomes) < 8:
            await asyncio.sleep(0.01)
        v2 = await upload(client, adapter_bytes(tiny_clip_dir, "pets", seed=2))
        assert v2.status_code == 201 and v2.json()["version"] == 2
        seen_before = len(outcomes)
        while len(outcomes) < seen_before + 8:
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.gather(*streams)
        assert all(status == 200 for status, _ in outcomes), outcomes
        assert {key for _, key in outcomes} <= {"pets@1", "pets@2"}
        assert outcomes[-1][1] == "pets@2"  # new requests see v2
        after = (await classify(client, 0, ["cat", "dog"], "pets")).json()
        assert after["adapter"] == "pets@2"
        assert logits_of(after) != pytest.approx(logits_of(with_v1), abs=1e-3)
        v1_again = (await classify(client, 0, ["cat", "dog"], "pets@1")).json()
        assert logits_of(v1_again) == pytest.approx(logits_of(with_v1), abs=1e-5)

        # Delete one version, then the name.
        assert (await client.delete("/v1/admin/adapters/pets@1", headers=AUTH)).json() == {
            "deleted": ["pets@1"]
        }
        assert (await classify(client, 0, ["cat"], "pets@1")).status_code == 404
        assert (await classify(client, 0, ["cat"], "pets")).json()["adapter"] == "pets@2"
        assert (await client.delete("/v1/admin/adapters/pets", headers=AUTH)).status_code == 200
        gone = await classify(client, 0, ["cat"], "pets")
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"
        assert (await client.delete("/v1/admin/adapters/pets", headers=AUTH)).status_code == 404
        assert (await client.get("/v1/adapters/pets")).status_code == 404


async def test_adapter_logits_equal_the_prompted_model(admin_settings, tiny_clip_dir):
    """The served adapter computes what adapters.prompted_clip computes in-process (which
    tests/adapters/test_maple_reference.py holds to the reference method)."""
    from fixtures.adapters import random_folded

    labels = ["tabby cat", "golden retriever", "boat"]
    async with running_app(admin_settings()) as (client, _):
        assert (await upload(client, adapter_bytes(tiny_clip_dir, "ref", seed=3))).status_code == 201
        served = logits_of((await classify(client, 4, labels, "ref")).json())
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_clip_dir)
    folded = random_folded(CLIPConfig.from_pretrained(tiny_clip_dir), 3)
    inputs = processor(
        text=[f"a photo of a {label}." for label in labels],
        images=make_image(4),
        return_tensors="pt",
        padding=True,
    )
    with torch.inference_mode():
        image = encode_image(model, inputs["pixel_values"], folded.vision[None])
        text = encode_text(
            model,
            inputs["input_ids"],
            inputs["attention_mask"],
            folded.text[None].expand(len(labels), -1, -1, -1),
        )
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        expected = (model.logit_scale.exp() * image @ text.T)[0].tolist()
    assert [served[label] for label in labels] == pytest.approx(expected, abs=1e-4)


async def test_mixed_adapter_batches_equal_one_by_one(admin_settings, tiny_clip_dir):
    names = [f"task{i}" for i in range(8)]
    requests = [(i, names[i % 9] if i % 9 < 8 else None) for i in range(32)]
    label_sets = [["cat", "dog"], ["boat", "plane", "train"], ["x-ray", "photo"]]
    settings = admin_settings(max_batch_size=32, max_wait_ms=300)
    async with running_app(settings) as (client, app):
        for i, name in enumerate(names):
            # two prompt shapes, so batches hold several groups
            assert (
                await upload(client, adapter_bytes(tiny_clip_dir, name, seed=10 + i, n_ctx=2 + i % 2))
            ).status_code == 201
        alone = [(await classify(client, seed, label_sets[seed % 3], name)).json() for seed, name in requests]
        together_responses = await asyncio.gather(
            *(classify(client, seed, label_sets[seed % 3], name) for seed, name in requests)
        )
        metrics = app.state.metrics.registry
        batches = metrics.get_sample_value("promptswap_batch_size_count", {"queue": "classify"})
    together = [r.json() for r in together_responses]
    assert batches < 64, "the concurrent requests were never batched"
    for one, many in zip(alone, together, strict=False):
        assert one["adapter"] == many["adapter"]
        a, b = logits_of(one), logits_of(many)
        assert a.keys() == b.keys()
        for label in a:
            assert a[label] == pytest.approx(b[label], abs=1e-5)


async def test_admin_routes_need_the_token(admin_settings, make_settings, tiny_clip_dir):
    data = adapter_bytes(tiny_clip_dir, "auth")
    async with running_app(admin_settings()) as (client, _):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = await upload(client, data, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
            assert TOKEN not in r.text
            assert (await client.delete("/v1/admin/adapters/auth", headers=headers)).status_code == 401
    async with running_app(make_settings()) as (client, _):  # no token configured: admin is off
        r = await upload(client, data, headers=AUTH)
        assert r.status_code == 404 and "off" in r.json()["error"]["message"]


def other_backbone_adapter() -> bytes:
    from adapters.format import dump
    from adapters.maple import FoldedMaple, clip_fingerprint

    config = tiny_clip_config(image_size=128)
    folded = FoldedMaple(torch.zeros(2, 2, 64), torch.zeros(2, 2, 96))
    return dump(folded, name="other", backbone=clip_fingerprint(config))


@pytest.mark.parametrize(
    "make_payload, fields, status, fragment",
    [
        (lambda d: pickle.dumps({"state_dict": {"ctx": [1.0]}}), {}, 400, ""),
        (lambda d: bytes(range(256)) * 16, {}, 400, ""),
        (lambda d: other_backbone_adapter(), {}, 409, "image_size"),
        (lambda d: nan_adapter_bytes(d, "nan"), {}, 422, "NaN"),
        (lambda d: adapter_bytes(d, "big", depth=4, n_ctx=16), {}, 413, ""),
        (lambda d: adapter_bytes(d, "ok"), {"name": "../escape"}, 422, "name"),
        (lambda d: adapter_bytes(d, "ok"), {"name": "UPPER"}, 422, "name"),
    ],
    ids=["pickle", "random-bytes", "other-backbone", "nan", "too-large", "path-traversal", "bad-name"],
)
async def test_bad_uploads_leave_the_store_unchanged(
    admin_settings, tiny_clip_dir, make_payload, fields, status, fragment
):
    settings = admin_settings(max_adapter_bytes=8192)
    async with running_app(settings) as (client, _):
        assert (await upload(client, adapter_bytes(tiny_clip_dir, "keep"))).status_code == 201
        before = store_snapshot(settings.adapter_dir)
        r = await upload(client, make_payload(tiny_clip_dir), **fields)
        assert r.status_code == status, r.text
        assert fragment in r.json()["error"]["message"]
        assert store_snapshot(settings.adapter_dir) == before
        assert not list((settings.adapter_dir / ".tmp").iterdir())
        assert (await classify(client, 0, ["cat"], "keep")).status_code == 200


async def test_template_too_short_for_the_adapter_is_422(admin_settings, tiny_clip_dir):
    async with running_app(admin_settings()) as (client, _):
        assert (await upload(client, adapter_bytes(tiny_clip_dir, "t", n_ctx=3))).status_code == 201
        r = await client.post(
            "/v1/classify",
            files={"image": ("i.png", encode(make_image(0)))},
            data={"labels": ["cat"], "adapter": "t", "template": "a {}"},
        )
        assert r.status_code == 422 and "tokens before the label" in r.json()["error"]["message"]


async def test_corrupted_stored_file_is_refused_and_the_rest_keeps_serving(admin_settings, tiny_clip_dir):
    settings = admin_settings()
    async with running_app(settings) as (client, _):
        for name in ("good", "flipped"):
            assert (await upload(client, adapter_bytes(tiny_clip_dir, name))).status_code == 201
        path = settings.adapter_dir / "flipped" / "1.safetensors"
        raw = bytearray(path.read_bytes())
        raw[-5] ^= 0x40  # a bit flip in the tensor data
        path.write_bytes(bytes(raw))
        r = await classify(client, 0, ["cat"], "flipped")
        assert r.status_code == 500 and r.json()["error"]["code"] == "adapter_corrupted"
        assert "sha256" in r.json()["error"]["message"]
        assert (await classify(client, 0, ["cat"], "good")).status_code == 200
        assert (await classify(client, 0, ["cat"])).status_code == 200


async def test_version_numbers_are_never_reused(admin_settings, tiny_clip_dir):
    async with running_app(admin_settings()) as (client, _):
        versions = []
        for seed in range(3):
            r = await upload(client, adapter_bytes(tiny_clip_dir, "again", seed=seed))
            versions.append(r.json()["version"])
            assert (await client.delete("/v1/admin/adapters/again", headers=AUTH)).status_code == 200
        assert versions == [1, 2, 3]
        assert (await classify(client, 0, ["cat"], "again@1")).status_code == 404


async def test_a_replaced_file_never_gets_the_old_contents_text_embeddings(
    admin_settings, tiny_clip_dir, tmp_path
):
    """Caches are keyed by content: a new file under the same name@version (another
    replica's delete + re-upload) is served as itself, text embeddings included."""
    labels = ["cat", "dog", "boat"]
    async with running_app(admin_settings(adapter_dir=tmp_path / "truth")) as (client, _):  # content B alone
        assert (await upload(client, adapter_bytes(tiny_clip_dir, "swap", seed=21))).status_code == 201
        want_b = logits_of((await classify(client, 0, labels, "swap")).json())
    settings = admin_settings()
    async with running_app(settings) as (client, _):
        assert (await upload(client, adapter_bytes(tiny_clip_dir, "swap", seed=20))).status_code == 201
        got_a = logits_of((await classify(client, 0, labels, "swap")).json())  # caches A's text
        path = settings.adapter_dir / "swap" / "1.safetensors"
        replacement = path.with_suffix(".new")
        replacement.write_bytes(adapter_bytes(tiny_clip_dir, "swap", seed=21))
        replacement.replace(path)
        got_b = logits_of((await classify(client, 0, labels, "swap")).json())
    assert got_a != pytest.approx(want_b, abs=1e-3)
    assert got_b == pytest.approx(want_b, abs=1e-5)


async def test_an_adapter_deleted_while_it_loads_is_404_not_500(admin_settings, tiny_clip_dir, monkeypatch):
    async with running_app(admin_settings()) as (client, app):
        assert (await upload(client, adapter_bytes(tiny_clip_dir, "gone"))).status_code == 201
        store = app.state.runtime.services.registry.store
        resolve = store.get

        def get_then_delete(name, version=None):  # the delete lands between resolve and read
            stored = resolve(name, version)
            if stored is not None:
                stored.path.unlink()
            return stored

        monkeypatch.setattr(store, "get", get_then_delete)
        r = await classify(client, 0, ["cat"], "gone")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


async def test_latest_deleted_while_it_loads_falls_back_to_the_remaining_version(
    admin_settings, tiny_clip_dir, monkeypatch
):
    async with running_app(admin_settings()) as (client, app):
        for seed in (1, 2):
            assert (await upload(client, adapter_bytes(tiny_clip_dir, "two", seed=seed))).status_code == 201
        store = app.state.runtime.services.registry.store
        resolve = store.get
        deleted = []

        def get_then_delete_latest(name, version=None):
            stored = resolve(name, version)
            if stored is not None and not deleted:  # once: the delete of @2 lands mid-request
                stored.path.unlink()
                deleted.append(stored.key)
            return stored

        monkeypatch.setattr(store, "get", get_then_delete_latest)
        r = await classify(client, 0, ["cat"], "two")
        assert deleted == ["two@2"]
        assert r.status_code == 200 and r.json()["adapter"] == "two@1"


def test_a_version_deleted_between_listing_and_stat_is_skipped(tmp_path, tiny_clip_dir, monkeypatch):
    import os

    from service.registry.store import AdapterStore

    store = AdapterStore(tmp_path)
    for seed in (1, 2):
        store.put("race", lambda v, seed=seed: adapter_bytes(tiny_clip_dir, "race", seed=seed))
    real_scandir = os.scandir

    def scandir_then_delete(path):  # another replica deletes @2 right after the listing
        entries = list(real_scandir(path))
        (tmp_path / "race" / "2.safetensors").unlink(missing_ok=True)
        return iter(entries)

    monkeypatch.setattr("service.registry.store.os.scandir", scandir_then_delete)
    assert [v.version for v in store.versions("race")] == [1]


async def loaded(client, name: str) -> bool:
    """Whether ``name``'s first version is on the device, as GET /v1/adapters/{name} says."""
    return (await client.get(f"/v1/adapters/{name}")).json()["versions"][0]["loaded"]
