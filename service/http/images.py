"""Image bytes -> RGB PIL image, with every bound checked before pixels are decoded.

Runs in the decode thread pool, never on the event loop (Pillow releases the GIL).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import InvalidImage, PayloadTooLarge

# Formats a browser or camera sends; everything else (TIFF, ICO, PSD, ...) is refused.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")


def decode_image(data: bytes, *, max_pixels: int, draft_min_side: int | None = None) -> Image.Image:
    """Decode ``data`` into an RGB image, orientation applied as transformers' loader does.

    ``draft_min_side`` (opt-in, changes pixels): a JPEG is decoded at the smallest of
    libjpeg's DCT scales (1/2, 1/4, 1/8) whose short side is still at least that many
    pixels, so the resize that follows starts from fewer pixels; other formats are
    unaffected. Bounds are checked on the full size first.
    """
    if not data:
        raise InvalidImage("the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
            if image.format not in ALLOWED_FORMATS:
                raise InvalidImage(
                    f"image format {image.format} is not supported; use one of " + ", ".join(ALLOWED_FORMATS)
                )
            width, height = image.size
            if width * height > max_pixels:
                raise PayloadTooLarge(
                    f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
                )
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)  # animated GIF/WebP: the first frame
            if draft_min_side is not None and image.format == "JPEG":
                _draft(image, draft_min_side)
            image.load()
            upright = ImageOps.exif_transpose(image)
            return _to_8bit(upright).convert("RGB")
    except (PayloadTooLarge, InvalidImage):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"image too large to decode: {exc}") from None
    except UnidentifiedImageError:
        raise InvalidImage("the file is not an image in a supported format") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidImage(f"the image could not be decoded: {exc}") from None


def _draft(image: Image.Image, min_side: int) -> None:
    width, height = image.size
    scale = min_side / min(width, height)
    if scale < 1:  # Pillow picks the coarsest scale that still covers the requested size
        image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit greyscale (PNG opens as I;16 or I) scaled to 8 bits; other modes unchanged.

    Pillow's ``convert("RGB")`` clips such pixels at 255, turning the picture white.
    """
    if not (image.mode == "I" or image.mode.startswith("I;16")):
        return image
    wide = np.asarray(image.convert("I"), dtype=np.int64).clip(0, 65535)  # (H, W)
    return Image.fromarray(((wide + 128) // 257).astype(np.uint8), "L")


def decode_base64_image(value: str, *, max_bytes: int) -> bytes:
    """Bytes of a base64 string or a ``data:image/...;base64,`` URL (no remote URLs)."""
    text = value.strip()
    if text.startswith(("http://", "https://", "file:", "ftp://")):
        raise InvalidImage("remote image URLs are not fetched; send the bytes (base64 or data: URL)")
    if text.startswith("data:"):
        header, sep, payload = text.partition(",")
        if not sep or ";base64" not in header:
            raise InvalidImage("a data: URL must be base64-encoded (data:image/png;base64,...)")
        text = payload
    if len(text) * 3 // 4 > max_bytes:
        raise PayloadTooLarge(f"image is over {max_bytes} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage("the image is not valid base64") from None
