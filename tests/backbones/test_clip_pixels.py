"""The direct CLIP recipe gives the processor's tensors bit for bit, and is only chosen
for a processor whose configuration it reproduces."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from fixtures.images import encode, make_image
from service.backbones.clip import ClipBackbone
from service.backbones.clip_pixels import ExactClipPixels
from service.http.images import decode_image

# Short side below, at and above 224; odd sizes where int() and round() of the long side
# differ (so the rounding is tested); both orientations; a very thin strip.
SIZES = [
    (640, 480),
    (480, 640),
    (301, 251),
    (251, 301),
    (333, 251),
    (224, 224),
    (225, 224),
    (100, 77),
    (901, 230),
    (7, 300),
]


def processor_pixels(ip: CLIPImageProcessorPil, image: Image.Image) -> torch.Tensor:
    return ip(images=image, return_tensors="pt")["pixel_values"][0]


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    from skimage import data

    return [Image.fromarray(getattr(data, name)()) for name in ("astronaut", "chelsea", "coffee", "camera")]


@pytest.fixture(scope="module")
def standard() -> tuple[CLIPImageProcessorPil, ExactClipPixels]:
    ip = CLIPImageProcessorPil()
    pixels = ExactClipPixels.for_processor(ip)
    assert pixels is not None
    return ip, pixels


def as_decoded(image: Image.Image, fmt: str = "PNG", **save: object) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return decode_image(buf.getvalue(), max_pixels=10**8)


def test_equal_to_the_processor_on_photos_at_odd_sizes(standard, photos) -> None:
    ip, pixels = standard
    for photo in photos:
        for size in SIZES:
            for fmt in ("PNG", "JPEG"):
                image = as_decoded(photo.convert("RGB").resize(size, Image.Resampling.BILINEAR), fmt)
                assert pixels.accepts(image)
                assert torch.equal(pixels(image), processor_pixels(ip, image)), (size, fmt)


def test_equal_on_modes_the_decoder_turns_into_rgb(standard, photos) -> None:
    """Grey, RGBA, palette, 16-bit and EXIF-rotated inputs, as the service decodes them."""
    ip, pixels = standard
    astronaut, camera = photos[0].resize((301, 257)), photos[3].resize((257, 301))
    wide = Image.fromarray((np.asarray(camera, np.uint16) * 257).astype(np.uint16))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    cases = {
        "grey": as_decoded(camera),
        "rgba": as_decoded(astronaut.convert("RGBA")),
        "palette": as_decoded(astronaut.convert("P")),
        "16-bit grey": as_decoded(wide),
        "exif rotated": as_decoded(astronaut, "JPEG", exif=exif.tobytes()),
    }
    assert cases["16-bit grey"].getextrema() != ((255, 255),) * 3  # really scaled, not clipped
    assert cases["exif rotated"].size == (257, 301)
    for name, image in cases.items():
        assert pixels.accepts(image), name
        assert torch.equal(pixels(image), processor_pixels(ip, image)), name


def test_images_with_transparency_keep_the_processor(standard) -> None:
    """The processor composites transparency onto white; the backbone sends such images
    to it rather than to the direct recipe."""
    ip, pixels = standard
    image = make_image(3, (240, 200))
    image.info["transparency"] = (10, 20, 30)
    assert not pixels.accepts(image)
    assert not pixels.accepts(image.convert("L"))


def test_the_fixture_sees_rounding_and_crop_offsets(standard, photos) -> None:
    """The equality above would catch round() for int() or a crop one pixel off."""
    ip, pixels = standard
    image = photos[1].resize((301, 251))
    want = processor_pixels(ip, image)
    assert round(224 * 301 / 251) != int(224 * 301 / 251)
    rounded = image.resize((round(224 * 301 / 251), 224), Image.Resampling.BICUBIC)
    assert not torch.equal(pixels.from_resized(np.asarray(rounded)), want)
    resized = np.asarray(image.resize(pixels.resized_size(301, 251), Image.Resampling.BICUBIC))
    assert torch.equal(pixels.from_resized(resized), want)
    assert not torch.equal(pixels.from_resized(resized[:, :-2]), want)  # crop starts one column left


@pytest.mark.parametrize(
    "change",
    [
        {"do_center_crop": False},
        {"do_normalize": False},
        {"do_rescale": False},
        {"do_convert_rgb": False},
        {"size": {"height": 224, "width": 224}},
        {"size": {"shortest_edge": 200}},  # smaller than the crop: the processor pads
        {"size": {"shortest_edge": 224, "longest_edge": 300}},
        {"image_mean": [0.5], "image_std": [0.5]},
        {"do_pad": True},
    ],
)
def test_nonstandard_configs_keep_the_processor(change) -> None:
    assert ExactClipPixels.for_processor(CLIPImageProcessorPil(**change)) is None


def test_other_processor_classes_keep_the_processor() -> None:
    class Custom(CLIPImageProcessorPil):
        pass

    assert ExactClipPixels.for_processor(Custom()) is None


def test_standard_parameters_other_than_clips_own_are_reproduced(photos) -> None:
    """A B/16@336-style config (other sizes, mean, std, filter) takes the direct recipe too."""
    ip = CLIPImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 320, "width": 300},
        image_mean=[0.5, 0.4, 0.3],
        image_std=[0.2, 0.3, 0.25],
        resample=Image.Resampling.BILINEAR,
    )
    pixels = ExactClipPixels.for_processor(ip)
    assert pixels is not None
    for size in SIZES[:4]:
        image = photos[0].resize(size)
        assert torch.equal(pixels(image), processor_pixels(ip, image))


def test_backbone_chooses_at_load(tiny_clip_dir, tmp_path) -> None:
    """The tiny checkpoint's standard processor gets the direct recipe; the same checkpoint
    with a non-default image processor keeps the processor, and both give its pixels."""
    import json
    import shutil

    standard = ClipBackbone.load(str(tiny_clip_dir), "cpu", "float32")
    assert standard.exact_pixels is not None
    odd_dir = tmp_path / "odd"
    shutil.copytree(tiny_clip_dir, odd_dir)
    config_file = odd_dir / "processor_config.json"
    config = json.loads(config_file.read_text())
    config["image_processor"].update(do_center_crop=False, size={"height": 224, "width": 224})
    config_file.write_text(json.dumps(config))
    odd = ClipBackbone.load(str(odd_dir), "cpu", "float32")
    assert odd.exact_pixels is None
    image = decode_image(encode(make_image(1, (333, 251))), max_pixels=10**8)
    for clip in (standard, odd):
        want = processor_pixels(clip.processor.image_processor, image)
        assert torch.equal(clip.preprocess(image), want)
    assert not torch.equal(standard.preprocess(image), odd.preprocess(image))
