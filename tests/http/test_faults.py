"""Faults inside the service: a full disk, a model forward that raises. Each fails only
what it touches, with a clear answer, and the service keeps serving."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest
from httpx import ASGITransport, AsyncClient

from fixtures.adapters import adapter_bytes
from service.backbones.clip import ClipBackbone
from service.registry import store as store_module
from tests.classify.test_errors import assert_error, form, still_serving
from tests.conftest import encode, make_image, running_app
from tests.http.test_overload import Gate
from tests.registry.test_admin_api import TOKEN, upload


def full_tree(root: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and directory under the store, the temp area included."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
    }


class FailingFile:
    """A file object whose writes hit a full disk."""

    def __init__(self, real, err: int) -> None:
        self.real, self.err = real, err

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.real.close()

    def write(self, data: bytes) -> int:
        raise OSError(self.err, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.real, name)


def fail_write(monkeypatch, err: int) -> None:
    monkeypatch.setattr(
        store_module, "open", lambda path, mode: FailingFile(open(path, mode), err), raising=False
    )


def fail_fsync(monkeypatch, err: int) -> None:
    def fsync(fd: int) -> None:
        raise OSError(err, "No space left on device")

    monkeypatch.setattr(store_module.os, "fsync", fsync)


@pytest.mark.parametrize(
    "fail, err",
    [(fail_write, errno.ENOSPC), (fail_fsync, errno.EDQUOT)],
    ids=["write-ENOSPC", "fsync-EDQUOT"],
)
async def test_full_disk_answers_507_and_leaves_the_store_unchanged(
    make_settings, tiny_clip_dir, monkeypatch, fail, err
):
    async with running_app(make_settings(admin_token=TOKEN)) as (client, app):
        root = app.state.settings.adapter_dir
        assert (await upload(client, adapter_bytes(tiny_clip_dir, "pets", seed=1))).status_code == 201
        before = full_tree(root)
        with monkeypatch.context() as patch:
            fail(patch, err)
            for name in ("pets", "fresh"):  # a new version of a name, and a new name
                response = await upload(client, adapter_bytes(tiny_clip_dir, name, seed=2))
                assert "space" in assert_error(response, 507, "insufficient_storage")["message"]
                assert full_tree(root) == before
        listing = (await client.get("/v1/adapters")).json()["adapters"]
        assert [(a["name"], a["latest"]) for a in listing] == [("pets", 1)]
        # The disk has room again: the next upload takes the next version at once.
        again = await upload(client, adapter_bytes(tiny_clip_dir, "pets", seed=2))
        assert again.status_code == 201 and again.json()["version"] == 2
        assert (
            await client.post("/v1/classify", **form(encode(make_image(0)), ["cat"], adapter="pets"))
        ).status_code == 200


async def test_model_exception_fails_only_its_batch(make_settings, monkeypatch, caplog):
    """The first batch is held in the model; the second (4 requests) raises in the image
    forward; the first and every later request are answered normally."""
    gate = Gate(monkeypatch)
    calls = []
    real = ClipBackbone.image_features

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ClipBackbone, "image_features", flaky)
    settings = make_settings(max_batch_size=8, max_wait_ms=0)
    async with running_app(settings) as (_, app):
        # As a server answers: Starlette re-raises a 500's exception after sending it.
        transport = ASGITransport(app=app, raise_app_exceptions=False)
        client = AsyncClient(transport=transport, base_url="http://test")
        image = encode(make_image(0))
        first = asyncio.ensure_future(client.post("/v1/classify", **form(image, ["cat"])))
        await gate.wait_entered()
        doomed = [
            asyncio.ensure_future(client.post("/v1/classify", **form(image, ["dog", str(i)])))
            for i in range(4)
        ]
        while app.state.runtime.services.classify.queue.depth < 4:  # all four wait behind the first
            await asyncio.sleep(0)
        gate.release.set()
        assert (await first).status_code == 200
        for response in await asyncio.gather(*doomed):
            error = assert_error(response, 500, "internal_error")
            assert "CUDA" not in error["message"]  # internals stay in the log
        assert gate.seen == [1, 4]
        await still_serving(client)
        after = await asyncio.gather(
            *(client.post("/v1/classify", **form(image, ["a", str(i)])) for i in range(4))
        )
        assert all(r.status_code == 200 for r in after)
        await client.aclose()
    assert "illegal memory access" in caplog.text  # the operator sees what happened
