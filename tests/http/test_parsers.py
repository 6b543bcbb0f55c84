"""Property tests on the request parsers: whatever the bytes or fields, the parsers
answer with a typed client error (or a result), never with anything else."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from starlette.requests import Request

from service.classify.request import parse_classify
from service.errors import ApiError, InvalidImage, PayloadTooLarge
from service.http.images import decode_base64_image, decode_image
from service.settings import Settings
from tests.conftest import make_image

PROPERTY = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def seeds() -> dict[str, bytes]:
    """One small valid file per accepted format, plus variants the decoders branch on."""
    rgb = make_image(3, (24, 16))
    out = {}
    for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP"):
        buf = io.BytesIO()
        rgb.save(buf, format=fmt)
        out[fmt] = buf.getvalue()
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate
    rgb.save(buf, format="JPEG", exif=exif.tobytes())
    out["JPEG-EXIF"] = buf.getvalue()
    buf = io.BytesIO()
    rgb.save(buf, format="GIF", save_all=True, append_images=[make_image(4, (24, 16))])
    out["GIF-ANIMATED"] = buf.getvalue()
    buf = io.BytesIO()
    rgb.convert("P").save(buf, format="PNG")
    out["PNG-P"] = buf.getvalue()
    return out


SEEDS = seeds()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif data:
            del data[at : at + draw(st.integers(1, 16))]
    return bytes(data)


def decodes_or_refuses(data: bytes, max_pixels: int = 10_000) -> None:
    try:
        image = decode_image(data, max_pixels=max_pixels)
    except (InvalidImage, PayloadTooLarge) as exc:
        assert exc.message
    else:
        assert image.mode == "RGB" and image.width * image.height <= max_pixels


@PROPERTY
@given(st.binary(max_size=2048))
def test_decode_image_random_bytes(data: bytes) -> None:
    decodes_or_refuses(data)


@PROPERTY
@given(mutated())
def test_decode_image_mutated_files(data: bytes) -> None:
    decodes_or_refuses(data)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_every_seed_decodes(name: str) -> None:
    assert decode_image(SEEDS[name], max_pixels=10_000).mode == "RGB"


@PROPERTY
@given(
    st.one_of(
        st.text(max_size=300),
        st.builds(
            lambda p, b: p + b,
            st.sampled_from(["data:", "data:image/png;base64,", "data:;base64,", "http://", " ", "file:"]),
            st.text(max_size=200),
        ),
        st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode()),
    ),
    st.integers(1, 400),
)
def test_decode_base64_image(value: str, max_bytes: int) -> None:
    try:
        data = decode_base64_image(value, max_bytes=max_bytes)
    except (InvalidImage, PayloadTooLarge) as exc:
        assert exc.message
    else:
        assert isinstance(data, bytes) and len(data) <= max_bytes


# ------------------------------------------------------------------ classify fields

SETTINGS = Settings(clip_model=None, max_labels=20, max_label_chars=40, max_template_chars=60)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
label_text = st.text(max_size=50) | st.sampled_from(["", " ", "\x00", "cat", "a\u200db", "\u202eevil"])
classify_objects = st.fixed_dictionaries(
    {},
    optional={
        "image": st.sampled_from(["", "aGk=", "data:image/png;base64,aGk=", "%%", "https://x"]) | json_values,
        "labels": st.lists(label_text, max_size=25) | json_values,
        "adapter": st.text(max_size=20) | json_values,
        "top_k": st.integers(-2, 50) | json_values,
        "template": st.sampled_from(["a {}.", "{}", "{} {}", "none"]) | st.text(max_size=80) | json_values,
    },
)


def request_for(body: bytes, content_type: str) -> Request:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    # "app" in the scope, as under the real app: starlette then turns parser errors into 400s.
    scope = {
        "type": "http",
        "app": object(),
        "method": "POST",
        "path": "/v1/classify",
        "query_string": b"",
        "headers": [
            (b"content-type", content_type.encode("latin-1")),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    return Request(scope, receive)


def parse(body: bytes, content_type: str) -> None:
    """The route's parse-and-bound steps; only ApiErrors (4xx) may come out."""

    async def run() -> None:
        call = await parse_classify(request_for(body, content_type), SETTINGS)
        labels = call.labels  # None: the adapter's own labels, checked once it is resolved
        if labels is not None:
            assert 1 <= len(labels) <= SETTINGS.max_labels
            assert all(0 < len(x) <= SETTINGS.max_label_chars and "\x00" not in x for x in labels)
        template = call.template
        assert template is None or template.count("{}") == 1
        assert call.top_k is None or call.top_k >= 1  # clamped to the labels once they are known
        assert isinstance(call.image, bytes)

    try:
        asyncio.run(run())
    except ApiError as exc:
        assert 400 <= exc.status < 500 and exc.message


@PROPERTY
@given(classify_objects | json_values)
def test_classify_json_fields(value: Any) -> None:
    parse(json.dumps(value).encode(), "application/json")


@PROPERTY
@given(st.binary(max_size=300))
def test_classify_json_random_bytes(body: bytes) -> None:
    parse(body, "application/json")


def multipart(fields: list[tuple[str, str | bytes]], boundary: str = "xBOUNDARYx") -> bytes:
    out = io.BytesIO()
    for name, value in fields:
        out.write(f"--{boundary}\r\n".encode())
        if isinstance(value, bytes):
            out.write(f'Content-Disposition: form-data; name="{name}"; filename="f"\r\n'.encode())
            out.write(b"Content-Type: application/octet-stream\r\n\r\n" + value + b"\r\n")
        else:
            out.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
            out.write(value.encode("utf-8", "surrogatepass") + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue()


form_fields = st.lists(
    st.tuples(
        st.sampled_from(["image", "labels", "adapter", "top_k", "template", "other"]),
        st.one_of(
            label_text,
            st.lists(label_text, max_size=5).map(json.dumps),
            st.sampled_from(["[", "[1, 2]", "3", "0", "-1", "1e9"]),
            st.binary(max_size=64),
        ),
    ),
    max_size=30,
)


@PROPERTY
@given(form_fields)
def test_classify_multipart_fields(fields: list[tuple[str, str | bytes]]) -> None:
    parse(multipart(fields), "multipart/form-data; boundary=xBOUNDARYx")


@PROPERTY
@given(form_fields, st.integers(0, 400), st.binary(max_size=16))
def test_classify_multipart_mangled(fields: list[tuple[str, str | bytes]], cut: int, junk: bytes) -> None:
    body = multipart(fields)
    parse(body[:cut] + junk + body[cut:], "multipart/form-data; boundary=xBOUNDARYx")
