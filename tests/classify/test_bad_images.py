"""Bad and hostile images on /v1/classify: undecodable, over a bound, decompression bombs,
odd modes, animations, EXIF orientation. Each is served as the picture it shows or refused
with a clear status and JSON body, and the service keeps serving after each."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile
from transformers.image_utils import load_image

from service.settings import Settings
from tests.classify.test_errors import assert_error, classify, form, still_serving
from tests.conftest import encode, make_image, running_app

# The tests on `client` share one app (they only read); the others start their own.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def client(module_client):
    return module_client


def logits(response) -> dict[str, float]:
    assert response.status_code == 200, response.text
    return {row["label"]: row["logit"] for row in response.json()["labels"]}


def tiff_bytes() -> bytes:
    return encode(make_image(1, (32, 32)), "TIFF")


def truncated_png() -> bytes:
    data = encode(make_image(2))
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "payload, status, code",
    [
        (b"this is not an image", 400, "invalid_image"),
        (truncated_png(), 400, "invalid_image"),
        (tiff_bytes(), 400, "invalid_image"),
        (b"", 400, "invalid_image"),
    ],
    ids=["not-an-image", "truncated", "unsupported-format", "empty"],
)
async def test_bad_images_are_400(client, payload, status, code):
    error = assert_error(await client.post("/v1/classify", **form(payload, ["cat"])), status, code)
    assert "image" in error["message"]
    await still_serving(client)


async def test_image_over_pixel_bound_is_413(make_settings):
    async with running_app(make_settings(max_image_pixels=100_000)) as (client, _):
        big = encode(make_image(0, (400, 300)))  # 120,000 pixels
        assert (
            "pixels" in assert_error(await client.post("/v1/classify", **form(big, ["cat"])), 413)["message"]
        )
        await still_serving(client)


async def test_decompression_bomb_is_413(client):
    from PIL import Image

    bomb = encode(Image.new("L", (12_000, 12_000)), "PNG")  # 144 Mpx in ~150 kB
    assert len(bomb) < 1_000_000
    assert_error(await client.post("/v1/classify", **form(bomb, ["cat"])), 413, "payload_too_large")
    await still_serving(client)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A valid-looking PNG header claiming ``width x height`` with a few bytes of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def gif_bomb(width: int = 65535, height: int = 65535) -> bytes:
    """A real 2x2 GIF whose screen and frame descriptors are patched to claim the size."""
    data = bytearray(encode(Image.new("P", (2, 2)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)  # logical screen descriptor
    at = data.index(b"\x2c", 13)  # image descriptor
    data[at + 5 : at + 9] = struct.pack("<HH", width, height)
    return bytes(data)


def webp_bomb(width: int = 16383, height: int = 16383) -> bytes:
    """A real 2x2 lossless WebP whose VP8L header is patched to claim the size."""
    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, format="WEBP", lossless=True)
    data = bytearray(buf.getvalue())
    at = data.index(b"VP8L") + 8
    assert data[at] == 0x2F
    bits = int.from_bytes(data[at + 1 : at + 5], "little")
    bits = (bits & ~((1 << 28) - 1)) | (width - 1) | ((height - 1) << 14)
    data[at + 1 : at + 5] = bits.to_bytes(4, "little")
    return bytes(data)


@pytest.fixture
def decode_calls(monkeypatch) -> list[tuple[int, int]]:
    """Every pixel decode (``ImageFile.load``) in the process, by claimed size."""
    calls: list[tuple[int, int]] = []
    original = ImageFile.ImageFile.load

    def spy(self):
        calls.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


@pytest.mark.parametrize(
    "bomb",
    [
        lambda: png_bomb(100_000, 100_000),
        lambda: png_bomb(2**31 - 1, 2**31 - 1),
        lambda: png_bomb(1, 50_000_000),
        lambda: gif_bomb(),
        lambda: webp_bomb(),
    ],
    ids=["png-10-gigapixels", "png-int32-max", "png-one-long-row", "gif-65535-square", "webp-16383-square"],
)
async def test_decompression_bombs_are_413_before_decoding(client, decode_calls, bomb):
    data = bomb()
    assert len(data) < 1000  # tiny on the wire
    error = assert_error(await classify(client, data), 413, "payload_too_large")
    assert "pixels" in error["message"] or "too large" in error["message"]
    assert decode_calls == [], "pixels were decoded before the size was checked"
    response = await client.post(
        "/v1/classify", json={"image": base64.b64encode(data).decode(), "labels": ["cat"]}
    )
    assert_error(response, 413, "payload_too_large")
    assert decode_calls == []
    await still_serving(client)


async def test_zero_sized_and_lying_headers_are_400(client):
    for data in (png_bomb(0, 10), png_bomb(10, 0), png_bomb(64, 64)):  # last: data far too short
        assert_error(await classify(client, data), 400, "invalid_image")
    await still_serving(client)


async def test_pixel_bound_is_exact(tiny_clip_dir, tmp_path):
    settings = Settings(
        clip_model=str(tiny_clip_dir),
        device="cpu",
        dtype="float32",
        adapter_dir=tmp_path,
        max_image_pixels=64 * 48,
    )
    async with running_app(settings) as (client, _):
        assert (await classify(client, encode(make_image(0, (64, 48))))).status_code == 200
        assert_error(await classify(client, encode(make_image(0, (65, 48)))), 413)


def image_bytes(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def rgb_png(image: Image.Image) -> bytes:
    return image_bytes(image.convert("RGB"), "PNG")


def reference_png(data: bytes) -> bytes:
    """What transformers' own loader makes of ``data`` (orientation, RGB), as a PNG; the
    RGB image keeps the palette's transparency colour, which CLIP's processor composites."""
    return image_bytes(load_image(Image.open(io.BytesIO(data))), "PNG")


BASE = make_image(5, (96, 64))


def sixteen_bit_png() -> tuple[bytes, bytes]:
    """16-bit grey: the same picture as 8-bit grey (transformers' loader clips it to white)."""
    grey = np.asarray(BASE.convert("L"), dtype=np.uint16)
    wide = Image.fromarray(grey * 257)
    assert wide.mode.startswith("I")
    return image_bytes(wide, "PNG"), rgb_png(BASE.convert("L"))


def like_transformers(image: Image.Image, **params) -> tuple[bytes, bytes]:
    data = image_bytes(image, "JPEG" if image.mode == "CMYK" else "PNG", **params)
    return data, reference_png(data)


def palette_with_transparency() -> Image.Image:
    return BASE.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)


def half_transparent() -> Image.Image:
    rgba = BASE.convert("RGBA")
    rgba.putalpha(128)
    return rgba


@pytest.mark.parametrize(
    "make",
    [
        sixteen_bit_png,
        lambda: like_transformers(BASE.convert("CMYK"), quality=95),
        lambda: like_transformers(palette_with_transparency(), transparency=0),
        lambda: like_transformers(BASE.convert("LA")),
        lambda: like_transformers(half_transparent()),
        lambda: like_transformers(BASE.convert("1")),
    ],
    ids=["png-16bit-grey", "jpeg-cmyk", "png-palette-trns", "png-la", "png-rgba", "png-1bit"],
)
async def test_image_modes_are_served_as_the_picture_they_show(client, make):
    data, same_picture = make()
    got, expected = logits(await classify(client, data)), logits(await classify(client, same_picture))
    assert got == pytest.approx(expected, abs=1e-4)


async def animated(fmt: str) -> tuple[bytes, Image.Image, Image.Image]:
    first, second = make_image(6, (64, 64)), make_image(7, (64, 64))
    params = {"lossless": True} if fmt == "WEBP" else {}
    data = image_bytes(first, fmt, save_all=True, append_images=[second], duration=100, loop=0, **params)
    frames = Image.open(io.BytesIO(data))
    assert frames.n_frames == 2
    frames.seek(0)
    shown_first = frames.convert("RGB")
    frames.seek(1)
    shown_second = frames.convert("RGB")
    return data, shown_first, shown_second


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
async def test_animated_images_use_the_first_frame(client, fmt):
    data, first, second = await animated(fmt)
    got = logits(await classify(client, data))
    assert got == pytest.approx(logits(await classify(client, rgb_png(first))), abs=1e-4)
    assert got != pytest.approx(logits(await classify(client, rgb_png(second))), abs=1e-4)


@pytest.mark.parametrize(
    "orientation, transpose",
    [
        (3, Image.Transpose.ROTATE_180),
        (6, Image.Transpose.ROTATE_270),
        (8, Image.Transpose.ROTATE_90),
        (2, Image.Transpose.FLIP_LEFT_RIGHT),
    ],
)
async def test_exif_orientation_is_applied(client, orientation, transpose):
    """A camera JPEG with an orientation tag classifies as the upright picture."""
    stored = make_image(8, (96, 48))  # not square: a missed rotation changes the picture
    plain = image_bytes(stored, "JPEG", quality=95)
    exif = Image.Exif()
    exif[0x0112] = orientation
    tagged = image_bytes(stored, "JPEG", quality=95, exif=exif.tobytes())
    pixels = Image.open(io.BytesIO(plain))
    assert np.array_equal(np.asarray(pixels), np.asarray(Image.open(io.BytesIO(tagged))))  # same scan
    upright = rgb_png(pixels.transpose(transpose))
    got = logits(await classify(client, tagged))
    assert got == pytest.approx(logits(await classify(client, upright)), abs=1e-4)
    assert got != pytest.approx(logits(await classify(client, plain)), abs=1e-4)
