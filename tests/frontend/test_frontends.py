"""``serve --frontends N``: a real model process behind real front-end processes answers every
classify request (good and bad) exactly as one process does, passes other routes through,
replaces a front end that dies, and on SIGTERM lets in-flight requests finish first."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image

from service.classify.request import ClassifyCall
from service.errors import ApiError, BadRequest, InvalidImage
from service.frontend import rows
from service.settings import Settings, SettingsError, load_settings
from tests.chat.test_chat import sse_payloads
from tests.conftest import encode, make_image, running_app
from tests.llava_fixtures import save_tiny_llava
from tests.test_cli import free_port, serve, wait_ready
from tests.test_process import finish_request, open_request, wait_refused

KEY = "frontend-key-7d21c9"


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def frontend_pids(pid: int) -> set[int]:
    """The front ends among ``pid``'s children (not multiprocessing's resource tracker)."""
    return {c for c in children(pid) if "resource_tracker" not in Path(f"/proc/{c}/cmdline").read_text()}


def jpeg(seed: int, size: tuple[int, int] = (320, 240)) -> bytes:
    out = io.BytesIO()
    make_image(seed).convert("RGB").resize(size).save(out, "JPEG", quality=90)
    return out.getvalue()


def rgba_png() -> bytes:
    """Transparency: the direct recipe does not take it, the processor does (float32 rows)."""
    image = make_image(3).convert("RGBA").resize((96, 80))
    image.putalpha(128)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


LABELS = ["a cat", "a dog", "a red square"]
# (description, request kwargs for httpx): good requests and each kind of refusal.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("jpeg", {"json": {"image": b64(jpeg(0)), "labels": LABELS}}),
    ("another jpeg", {"json": {"image": b64(jpeg(1, (200, 400))), "labels": LABELS, "top_k": 2}}),
    ("png with transparency", {"json": {"image": b64(rgba_png()), "labels": LABELS}}),
    ("multipart", {"files": {"image": ("i.png", encode(make_image(4)))}, "data": {"labels": LABELS}}),
    ("images, one bad", {"json": {"images": [b64(jpeg(2)), "not base64!", b64(b"junk")], "labels": LABELS}}),
    ("bad base64", {"json": {"image": "not base64!", "labels": LABELS}}),
    ("not an image", {"json": {"image": b64(b"junk"), "labels": LABELS}}),
    ("unknown field", {"json": {"image": b64(jpeg(0)), "labels": LABELS, "lables": 1}}),
    ("not JSON", {"content": b"{", "headers": {"content-type": "application/json"}}),
    ("no labels", {"json": {"image": b64(jpeg(0))}}),
    ("duplicate labels", {"json": {"image": b64(jpeg(0)), "labels": ["a", "a"]}}),
    ("unknown adapter, bad image", {"json": {"image": "x", "labels": LABELS, "adapter": "nope"}}),
    ("unknown query", {"json": {"image": b64(jpeg(0)), "labels": LABELS}, "params": {"k": "1"}}),
    ("media type", {"content": b"x", "headers": {"content-type": "text/plain"}}),
    ("over the body bound", {"json": {"image": "A" * 420_000, "labels": LABELS}}),
    ("the rows type itself", {"content": b"\0\0\0\2{}", "headers": {"content-type": rows.ROWS_TYPE}}),
]

GOOD = {"jpeg", "another jpeg", "png with transparency", "multipart", "images, one bad"}


def _kwargs(case: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(case)
    headers = {"X-API-Key": KEY, **kwargs.pop("headers", {})}
    return {**kwargs, "headers": headers}


def _answer(r: httpx.Response) -> tuple[int, Any, str | None]:
    return r.status_code, r.json(), r.headers.get("retry-after")


@pytest.mark.slow  # two real processes and a reference app: about 20 s
async def test_frontends_answer_as_one_process_and_drain_on_sigterm(tiny_clip_dir: Path, tmp_path: Path):
    llava = save_tiny_llava(tmp_path / "llava")
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{KEY}\n")
    bounds = {"max_body_bytes": 400_000, "api_keys_file": keys}
    port = free_port()
    argv = ["--clip-model", str(tiny_clip_dir), "--device", "cpu", "--port", str(port), "--frontends", "2"]
    argv += [
        "--llava-model",
        str(llava),
        "--max-body-bytes",
        "400000",
        "--api-keys-file",
        str(keys),
        "--torch-threads",
        "1",
    ]
    private = tmp_path / "tmp"  # where the model's process makes its private socket directory
    private.mkdir()
    proc = serve(argv, env={"PROMPTSWAP_ADAPTER_DIR": str(tmp_path / "store"), "TMPDIR": str(private)})
    url = f"http://127.0.0.1:{port}"
    settings = Settings(
        clip_model=str(tiny_clip_dir),
        llava_model=str(llava),
        device="cpu",
        adapter_dir=tmp_path / "ref-store",
        torch_threads=1,
        **bounds,
    )
    try:
        wait_ready(proc, url)
        fronts = frontend_pids(proc.pid)
        assert len(fronts) == 2
        async with (
            running_app(settings) as (reference, _),
            httpx.AsyncClient(base_url=url, timeout=60) as split,
        ):
            for name, case in CASES:
                want = _answer(await reference.post("/v1/classify", **_kwargs(case)))
                assert (want[0] == 200) == (name in GOOD), (name, want)
                got = await split.post("/v1/classify", **_kwargs(case))
                assert _answer(got) == want, name  # status, whole body (logits bit for bit), Retry-After
                assert "frontend;dur=" in ",".join(got.headers.get_list("server-timing")), name
            # Counted where one process counts them, as it counts them.
            assert await classify_counts(split) == await classify_counts(reference)
            # The pixels matter: a path that lost them could not give two images different logits.
            first, second = [
                (await split.post("/v1/classify", **_kwargs(CASES[i][1]))).json()["labels"] for i in (0, 1)
            ]
            assert {x["label"]: x["logit"] for x in first} != {x["label"]: x["logit"] for x in second}
            # Without a key: the model's process answers 401 (and the front end read no image).
            r = await split.post("/v1/classify", json={"image": b64(jpeg(0)), "labels": LABELS})
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
            # Other routes pass through: the page, listings, metrics counting the front ends' requests.
            assert (await split.get("/", headers={"X-API-Key": KEY})).text.startswith("<!doctype html>")
            models = (await split.get("/v1/models", headers={"X-API-Key": KEY})).json()["data"]
            assert sorted(m["task"] for m in models) == ["chat", "classify"]
            # A chat stream passes through as it is made: the same events, more than one.
            ask = {"image": b64(encode(make_image(2))), "instruction": "what is in it", "max_tokens": 12}
            streamed = {"json": {**ask, "stream": True}, "headers": {"X-API-Key": KEY}}
            want_events = sse_payloads((await reference.post("/v1/chat", **streamed)).text)
            async with split.stream("POST", "/v1/chat", **streamed) as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                got_events = sse_payloads("".join([chunk async for chunk in r.aiter_text()]))
            assert len(got_events) > 1
            assert [e["text"] for e in got_events] == [e["text"] for e in want_events]

        # A front end that dies is replaced; the service answers throughout.
        victim = min(fronts)
        os.kill(victim, signal.SIGKILL)
        r = httpx.post(f"{url}/v1/classify", **_kwargs(CASES[0][1]), timeout=60)
        assert r.status_code == 200, r.text
        replaced = wait_for(lambda: len(frontend_pids(proc.pid) - {victim}) == 2)
        assert replaced, frontend_pids(proc.pid)
        fronts = frontend_pids(proc.pid) - {victim}

        # SIGTERM with a request in flight on a front end (waiting for its body): it is answered,
        # then every process exits and the private socket's directory is gone.
        body = json.dumps({"image": b64(jpeg(0)), "labels": LABELS}).encode()
        sock, rest = open_request(port, body, KEY)
        assert list(private.iterdir()), "the model's process listens in a private directory here"
        proc.send_signal(signal.SIGTERM)
        wait_refused(port)
        status, answer = finish_request(sock, rest)
        assert status == 200, answer
        assert json.loads(answer)["labels"][0]["label"] in LABELS
        proc.communicate(timeout=60)
        assert not any(Path(f"/proc/{pid}").exists() for pid in fronts)  # exited and reaped
        assert list(private.iterdir()) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


async def classify_counts(client: httpx.AsyncClient) -> dict[str, float]:
    """Classify requests by status. One process counts a 413 from Content-Length before
    routing (route "unmatched"), a front end's as /v1/classify: both are summed."""
    counts: dict[str, float] = {}
    for line in (await client.get("/metrics")).text.splitlines():
        if line.startswith(
            ('promptswap_requests_total{route="/v1/classify"', 'promptswap_requests_total{route="unmatched"')
        ):
            status = line.split('status="')[1].split('"')[0]
            counts[status] = counts.get(status, 0) + float(line.rsplit(" ", 1)[1])
    return counts


def wait_for(condition: Callable[[], bool], limit_s: float = 60) -> bool:
    give_up = time.monotonic() + limit_s
    while time.monotonic() < give_up:
        if condition():
            return True
        time.sleep(0.1)  # polling a child process's state, not a timing assertion
    return False


# --- the rows themselves ------------------------------------------------------------------


SHAPES = {torch.float32: (3, 4, 4), torch.uint8: (4, 4, 3)}


def _settings() -> Settings:
    return Settings(clip_model="x")


def test_rows_carry_pixels_and_errors_in_order():
    call = ClassifyCall(image=b"", labels=["a", "b"], template=None, top_k=1, adapter="pets", images=[])
    crop = torch.arange(48, dtype=torch.uint8).view(4, 4, 3)
    finished = torch.randn(3, 4, 4)
    body = rows.encode_call(call, [crop, InvalidImage("bad one"), finished], many=True)
    got = rows.decode_call(bytearray(body), _settings(), SHAPES)
    assert (got.labels, got.top_k, got.adapter) == (["a", "b"], 1, "pets")
    assert got.images is not None and len(got.images) == 3
    first, error, third = got.images
    assert isinstance(first, torch.Tensor) and torch.equal(first, crop)
    assert isinstance(third, torch.Tensor) and torch.equal(third, finished)
    assert not isinstance(error, torch.Tensor | bytes)
    assert (error.status, error.code, error.message) == (400, "invalid_image", "bad one")


@pytest.mark.parametrize(
    "row",
    [
        torch.zeros(3, 4, 5),
        torch.zeros(4, 4, 3),
        torch.zeros(4, 4, 3, dtype=torch.int16),
    ],
)
def test_rows_of_another_shape_or_dtype_are_refused(row: torch.Tensor):
    call = ClassifyCall(image=b"", labels=["a"], template=None, top_k=None, adapter=None)
    body = rows.encode_call(call, [row], many=False)
    with pytest.raises(BadRequest, match="front-end rows"):
        rows.decode_call(bytearray(body), _settings(), SHAPES)


def test_a_truncated_or_padded_rows_body_is_refused():
    call = ClassifyCall(image=b"", labels=["a"], template=None, top_k=None, adapter=None)
    body = rows.encode_call(call, [torch.zeros(3, 4, 4)], many=False)
    for broken in (body[:-1], body + b"\0", body[:3]):
        with pytest.raises(BadRequest):
            rows.decode_call(bytearray(broken), _settings(), SHAPES)


def test_the_labels_are_checked_again_where_they_are_used():
    call = ClassifyCall(image=b"", labels=["a", "a"], template=None, top_k=None, adapter=None)
    body = rows.encode_call(call, [torch.zeros(3, 4, 4)], many=False)
    with pytest.raises(ApiError, match="more than once"):
        rows.decode_call(bytearray(body), _settings(), SHAPES)


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"frontends": 1, "llava_model": "x"}, "loads no CLIP model"),
        ({"frontends": 1, "device_preprocess": True}, "use one of them"),
    ],
)
def test_frontends_refuse_what_they_cannot_serve(overrides: dict[str, Any], says: str):
    with pytest.raises(SettingsError, match=says):
        load_settings(overrides)


def test_serve_ray_refuses_frontends(capsys: pytest.CaptureFixture[str]):
    from service.cli import main

    assert main(["serve-ray", "--frontends", "2"]) == 2
    assert "--frontends is for `serve`" in capsys.readouterr().err


def test_a_frontend_crop_is_the_exact_recipe(tiny_clip_dir: Path):
    """What a front end sends (the uint8 crop), finished by the model's process, equals the
    checkpoint's processor."""
    from service.backbones.clip import ClipBackbone
    from service.frontend.app import ClipImages

    images, clip = ClipImages(str(tiny_clip_dir)), ClipBackbone.load(str(tiny_clip_dir), "cpu", "float32")
    photo = Image.open(io.BytesIO(jpeg(5, (333, 250))))
    row = images(photo)
    assert row.dtype == torch.uint8
    want = clip.processor.image_processor(images=photo, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(clip.pixel_batch([row])[0], want)
