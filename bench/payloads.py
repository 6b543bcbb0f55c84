"""Request payloads: real photographs as JPEG at a phone-upload size, fixed label sets."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image

PHOTO_SIZE = (640, 480)
JPEG_QUALITY = 90

# scikit-image ships these real photographs (see shared/MODELS.md).
PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "retina",
    "hubble_deep_field",
    "immunohistochemistry",
)

LABELS_10 = [
    "cat",
    "dog",
    "astronaut",
    "rocket",
    "cup of coffee",
    "galaxy",
    "person",
    "car",
    "tree",
    "building",
]
_EXTRA = [
    "airplane",
    "apple",
    "backpack",
    "banana",
    "baseball bat",
    "bear",
    "bed",
    "bench",
    "bicycle",
    "bird",
    "boat",
    "book",
    "bottle",
    "bowl",
    "broccoli",
    "bus",
    "cake",
    "camera",
    "carrot",
    "cell phone",
    "chair",
    "clock",
    "couch",
    "cow",
    "dining table",
    "donut",
    "elephant",
    "fire hydrant",
    "fork",
    "frisbee",
    "giraffe",
    "hair drier",
    "handbag",
    "horse",
    "hot dog",
    "keyboard",
    "kite",
    "knife",
    "laptop",
    "microwave",
    "motorcycle",
    "mouse",
    "orange",
    "oven",
    "parking meter",
    "pizza",
    "potted plant",
    "refrigerator",
    "remote",
    "sandwich",
    "scissors",
    "sheep",
    "sink",
    "skateboard",
    "skis",
    "snowboard",
    "spoon",
    "sports ball",
    "stop sign",
    "suitcase",
    "surfboard",
    "teddy bear",
    "tennis racket",
    "tie",
    "toaster",
    "toilet",
    "toothbrush",
    "traffic light",
    "train",
    "truck",
    "tv",
    "umbrella",
    "vase",
    "wine glass",
    "zebra",
    "microscope slide",
    "nebula",
    "space shuttle",
    "espresso",
    "kitten",
    "tabby cat",
    "portrait",
    "photographer",
    "tripod",
    "saucer",
    "launch pad",
    "moon",
    "star cluster",
    "tissue sample",
    "painting",
]
LABELS_100 = LABELS_10 + _EXTRA[:90]
assert len(LABELS_100) == 100 and len(set(LABELS_100)) == 100


def _to_rgb(array) -> Image.Image:
    image = Image.fromarray(array)
    return image.convert("RGB")


@lru_cache(maxsize=1)
def photos() -> list[tuple[str, bytes]]:
    """(name, JPEG bytes) for each photo, resized to PHOTO_SIZE (landscape)."""
    from skimage import data

    out = []
    for name in PHOTOS:
        image = _to_rgb(getattr(data, name)()).resize(PHOTO_SIZE, Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
        out.append((name, buf.getvalue()))
    return out


@dataclass(frozen=True)
class Body:
    """A pre-encoded multipart body, so the load generator spends no CPU building it."""

    content: bytes
    content_type: str


def multipart(
    image: bytes, labels: list[str], adapter: str | None = None, field_image: str = "image"
) -> Body:
    boundary = "promptswapbenchboundary7d1f"
    parts: list[bytes] = []

    def field(name: str, value: str) -> None:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        )

    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field_image}"; filename="photo.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n".encode()
        + image
        + b"\r\n"
    )
    field("labels", json.dumps(labels))
    if adapter is not None:
        field("adapter", adapter)
    parts.append(f"--{boundary}--\r\n".encode())
    return Body(b"".join(parts), f"multipart/form-data; boundary={boundary}")
