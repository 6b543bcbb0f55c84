"""Hostile adapter uploads and names: refused with a clear status and JSON body, nothing
outside the store is ever read or touched, and the store stays as it was."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path
from urllib.parse import quote

import pytest
import torch

from adapters.format import METADATA_KEY
from fixtures.adapters import adapter_bytes
from tests.classify.test_errors import assert_error
from tests.conftest import encode, make_image, running_app
from tests.registry.test_admin_api import AUTH, TOKEN, store_snapshot, upload

TRAVERSALS = [
    "..",
    "../x",
    "../../etc/passwd",
    "..%2fsecret",
    "..\\secret",
    "/etc/passwd",
    "pets/../../secret",
    "pets@1/../..",
    "pets@../1",
    "secret\x00",
    ".tmp",
    ".hidden",
    "Secret",
    "a" * 65,
    "%2e%2e",
    "pets@0",
    "pets@-1",
    "pets@1e3",
    "pets@99999999999999999999",
    "~root",
    "ａｂｃ",
]


def tree(root: Path) -> set[str]:
    """Every path (files and directories) under ``root``, the temp area excepted."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if ".tmp" not in p.relative_to(root).parts}


@pytest.fixture
def layout(tmp_path: Path, tiny_clip_dir: Path) -> dict[str, Path]:
    """The store plus a valid-looking adapter *next to* it, where a traversal would land."""
    store = tmp_path / "store"
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "1.safetensors").write_bytes(adapter_bytes(tiny_clip_dir, "secret"))
    return {"store": store, "secret": secret / "1.safetensors"}


async def test_path_traversal_in_names_on_every_route(make_settings, layout, tiny_clip_dir):
    settings = make_settings(admin_token=TOKEN, adapter_dir=layout["store"])
    async with running_app(settings) as (client, _):
        assert (await upload(client, adapter_bytes(tiny_clip_dir, "pets"))).status_code == 201
        before = store_snapshot(layout["store"])
        image = encode(make_image(0))
        for ref in TRAVERSALS:
            encoded = quote(ref, safe="")
            raw = ref if ref.isprintable() else encoded  # as sent, and percent-encoded
            for response in (
                await client.get(f"/v1/adapters/{encoded}"),
                await client.get(f"/v1/adapters/{raw}"),
                await client.delete(f"/v1/admin/adapters/{encoded}", headers=AUTH),
                await client.delete(f"/v1/admin/adapters/{raw}", headers=AUTH),
                await client.post(
                    "/v1/classify",
                    files={"image": ("i.png", image)},
                    data={"labels": ["cat"], "adapter": ref},
                ),
                await client.post("/v1/classify", json={"image": "aGk=", "labels": ["cat"], "adapter": ref}),
            ):
                assert response.status_code in (400, 404, 405, 422), (
                    ref,
                    response.status_code,
                    response.text,
                )
                assert_error(response, response.status_code)
            # The name field of an upload.
            response = await upload(client, adapter_bytes(tiny_clip_dir, "pets"), name=ref)
            assert response.status_code in (400, 422), (ref, response.text)
            assert_error(response, response.status_code)
        assert layout["secret"].exists(), "a traversal deleted a file outside the store"
        assert store_snapshot(layout["store"]) == before
        listing = (await client.get("/v1/adapters")).json()["adapters"]
        assert [a["name"] for a in listing] == ["pets"]


async def raw_call(app, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """One request straight into the ASGI app, the path exactly as given: clients
    normalise '..' segments away, a hostile one does not."""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogateescape"),
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body)


async def test_dot_segments_reach_the_routes_unnormalised_and_are_refused(
    make_settings, layout, tiny_clip_dir
):
    async with running_app(make_settings(admin_token=TOKEN, adapter_dir=layout["store"])) as (client, app):
        assert (await upload(client, adapter_bytes(tiny_clip_dir, "pets"))).status_code == 201
        before = store_snapshot(layout["store"])
        for name in ("..", ".", "...", "../secret", "..%2Fsecret", "pets/../../secret", "pets@1/.."):
            for method, path, headers in (
                ("GET", f"/v1/adapters/{name}", None),
                ("DELETE", f"/v1/admin/adapters/{name}", AUTH),
            ):
                status, body = await raw_call(app, method, path, headers)
                assert status in (404, 405, 422), (path, status, body)
                assert set(body) == {"error"} and body["error"]["message"]
        assert layout["secret"].exists()
        assert store_snapshot(layout["store"]) == before


def with_manifest_name(data: bytes, name: str) -> bytes:
    """The same adapter file with another name written into its manifest."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    manifest = json.loads(header["__metadata__"][METADATA_KEY])
    manifest["name"] = name
    header["__metadata__"][METADATA_KEY] = json.dumps(manifest)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


async def test_traversal_in_the_manifest_name_is_refused(make_settings, layout, tiny_clip_dir):
    async with running_app(make_settings(admin_token=TOKEN, adapter_dir=layout["store"])) as (client, _):
        for name in ("../secret", "..", "/tmp/x", "a/b"):
            response = await upload(client, with_manifest_name(adapter_bytes(tiny_clip_dir, "ok"), name))
            assert response.status_code in (400, 422), response.text
            assert_error(response, response.status_code)
        assert tree(layout["store"]) == set()


def safetensors_claiming(
    shape: list[int], end: int, data: bytes = b"\0" * 16, header_len: int | None = None
) -> bytes:
    manifest = {
        "format_version": 1,
        "name": "huge",
        "version": 0,
        "method": "maple",
        "backbone": {},
        "hyperparameters": {"n_ctx": 2, "depth": 3},
        "tensors_sha256": "0" * 64,
    }
    header = {
        "__metadata__": {METADATA_KEY: json.dumps(manifest)},
        "text_prompts": {"dtype": "F32", "shape": shape, "data_offsets": [0, end]},
        "vision_prompts": {"dtype": "F32", "shape": [1], "data_offsets": [end, end + 4]},
    }
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


@pytest.mark.parametrize(
    "payload",
    [
        safetensors_claiming([100_000, 100_000, 100_000], 4 * 10**15),
        safetensors_claiming([2**62, 2**62], 2**63),
        safetensors_claiming([3, 2, 64], 3 * 2 * 64 * 4),  # right size claimed, 16 bytes present
        safetensors_claiming([1], 4, header_len=2**63 - 1),  # header length past everything
        safetensors_claiming([1], 4, header_len=60 * 2**20),
        b"\xff" * 8 + b"{}",
    ],
    ids=["1e15-elements", "2^124-elements", "short-data", "header-2^63", "header-60MiB", "all-ones-length"],
)
async def test_header_claiming_huge_tensors_is_refused_without_allocating(make_settings, tmp_path, payload):
    async with running_app(make_settings(admin_token=TOKEN)) as (client, app):
        response = await upload(client, payload)
        assert response.status_code in (400, 413, 422), response.text
        assert_error(response, response.status_code)
        assert tree(app.state.settings.adapter_dir) == set()


async def test_a_jpeg_upload_is_refused_as_not_safetensors(make_settings):
    jpeg = encode(make_image(0, (64, 48)), "JPEG")
    async with running_app(make_settings(admin_token=TOKEN)) as (client, app):
        response = await upload(client, jpeg)
        error = assert_error(response, 400, "adapter_format")
        assert "not a safetensors file (it looks like a JPEG image)" in error["message"]
        assert not any(ch.isdigit() for ch in error["message"])  # no header "length" read from the JPEG
        assert tree(app.state.settings.adapter_dir) == set()


class Boom:
    """Unpickling this would create the marker file: it must never happen."""

    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


async def test_pickle_disguised_as_safetensors_is_never_unpickled(make_settings, tmp_path):
    marker = tmp_path / "pwned"
    Boom.marker = str(marker)
    raw_pickle = pickle.dumps({"text_prompts": Boom()})
    torch_zip = io.BytesIO()
    torch.save({"text_prompts": torch.zeros(3, 2, 64), "evil": Boom()}, torch_zip)
    assert zipfile.is_zipfile(io.BytesIO(torch_zip.getvalue()))
    async with running_app(make_settings(admin_token=TOKEN)) as (client, app):
        for payload in (raw_pickle, torch_zip.getvalue()):
            response = await client.post(
                "/v1/admin/adapters", files={"file": ("pets.safetensors", payload)}, headers=AUTH
            )
            assert_error(response, 400)
        assert not marker.exists(), "the upload was unpickled"
        assert tree(app.state.settings.adapter_dir) == set()
