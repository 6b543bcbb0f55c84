"""Opt-in reduced-size JPEG decode: the smallest DCT scale that keeps the model's input
size, off by default (then pixels are the full decode's)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fixtures.images import encode, make_image
from service.http.images import decode_image
from tests.conftest import running_app


def jpeg(size: tuple[int, int], **save: object) -> bytes:
    buf = io.BytesIO()
    make_image(7, size).save(buf, format="JPEG", quality=92, **save)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1280, 960), (320, 240)),  # 1/4: 240 >= 224, 1/8 would give 120
        ((640, 480), (320, 240)),
        ((4032, 3024), (504, 378)),  # 1/8
        ((300, 230), (300, 230)),  # no DCT scale keeps 224: full size
    ],
)
def test_draft_picks_the_smallest_scale_keeping_the_short_side(size, expected) -> None:
    data = jpeg(size)
    assert decode_image(data, max_pixels=10**8).size == size
    assert decode_image(data, max_pixels=10**8, draft_min_side=224).size == expected


def test_draft_leaves_other_formats_and_orientation_alone() -> None:
    png = encode(make_image(1, (1280, 960)), "PNG")
    assert decode_image(png, max_pixels=10**8, draft_min_side=224).size == (1280, 960)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: applied after the reduced decode
    rotated = decode_image(jpeg((1280, 960), exif=exif.tobytes()), max_pixels=10**8, draft_min_side=224)
    assert rotated.size == (240, 320)


def test_draft_still_checks_the_full_size_against_the_pixel_bound() -> None:
    from service.errors import PayloadTooLarge

    with pytest.raises(PayloadTooLarge):
        decode_image(jpeg((1280, 960)), max_pixels=1280 * 960 - 1, draft_min_side=224)


async def test_off_by_default_and_opt_in_changes_logits_slightly(make_settings) -> None:
    data = jpeg((1280, 960))
    labels = ["cat", "dog", "car"]
    answers = {}
    for draft in (False, True):
        settings = make_settings(jpeg_draft=True) if draft else make_settings()
        assert settings.jpeg_draft is draft
        async with running_app(settings) as (client, _):
            response = await client.post(
                "/v1/classify", files={"image": ("i.jpg", data, "image/jpeg")}, data={"labels": labels}
            )
            assert response.status_code == 200, response.text
            answers[draft] = {row["label"]: row["logit"] for row in response.json()["labels"]}
    full, drafted = (np.array([answers[d][x] for x in labels]) for d in (False, True))
    assert not np.array_equal(full, drafted)  # really decoded differently
    assert np.abs(full - drafted).max() < 1.0
