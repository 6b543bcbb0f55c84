"""Opt-in device preprocessing (``--device-preprocess``): close to the exact recipe, rows
independent of their batch neighbours' sizes, wired through classify and embeddings,
and refused where it cannot apply."""

from __future__ import annotations

import base64

import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from transformers import CLIPProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from fixtures.images import encode, make_image
from fixtures.tiny_models import save_tiny_clip
from service.backbones.clip_pixels import ExactClipPixels
from service.backbones.device_pixels import DevicePixels
from service.settings import Settings
from tests.conftest import running_app

SIZES = [(640, 480), (480, 640), (301, 251), (224, 224), (901, 230), (100, 77)]


@pytest.fixture(scope="module")
def recipes() -> tuple[ExactClipPixels, DevicePixels]:
    exact = ExactClipPixels.for_processor(CLIPImageProcessorPil())
    assert exact is not None
    return exact, DevicePixels(exact, torch.device("cpu"))


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    from skimage import data

    return [Image.fromarray(getattr(data, n)()).convert("RGB") for n in ("astronaut", "chelsea", "coffee")]


def test_within_a_few_levels_of_the_exact_recipe(recipes, photos):
    exact, device = recipes
    level = exact.rescale_factor / torch.tensor(exact.std).view(3, 1, 1)  # one 8-bit step, normalised
    for photo in photos:
        for size in SIZES:
            image = photo.resize(size)
            want = exact(image)
            got = device.batch([device.host(image)])[0]
            assert got.shape == want.shape and got.dtype == torch.float32
            levels = ((got - want) / level).abs()
            assert float(levels.mean()) < 0.3 and float(levels.max()) <= 10, size
            if size == (224, 224):  # no resize: the same 8-bit values, normalised
                torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_a_row_does_not_depend_on_its_neighbours_sizes(recipes, photos):
    _, device = recipes
    images = [device.host(p.resize(s)) for p, s in zip(photos * 2, SIZES, strict=True)]
    together = device.batch(images)
    for i, image in enumerate(images):
        assert torch.equal(together[i], device.batch([image])[0]), SIZES[i]


def b64(seed: int) -> str:
    return base64.b64encode(encode(make_image(seed, size=(97 + 40 * seed, 80 + 31 * seed)))).decode()


async def test_classify_and_embeddings_go_through_it(make_settings):
    labels = ["a cat", "a dog", "a car"]

    async def serve(**options):
        async with running_app(make_settings(**options)) as (client, app):
            clip = app.state.runtime.services.classify.clip
            logits = []
            for seed in range(3):
                r = await client.post("/v1/classify", json={"image": b64(seed), "labels": labels})
                assert r.status_code == 200, r.text
                logits.append({x["label"]: x["logit"] for x in r.json()["labels"]})
            body = {"model": clip.model_id, "input": [f"data:image/png;base64,{b64(0)}"]}
            e = await client.post("/v1/embeddings", json=body)
            assert e.status_code == 200, e.text
            return clip.device_pixels is not None, logits, e.json()["data"][0]["embedding"]

    on, device_logits, device_embedding = await serve(device_preprocess=True)
    off, exact_logits, exact_embedding = await serve()
    assert on and not off
    for d, x in zip(device_logits, exact_logits, strict=True):
        assert max(abs(d[k] - x[k]) for k in labels) < 0.05
    assert device_logits != exact_logits, "the device path never ran (the logits are the exact ones)"
    assert max(abs(a - b) for a, b in zip(device_embedding, exact_embedding, strict=True)) < 0.01


async def test_refused_for_a_processor_it_does_not_reproduce(make_settings, tmp_path):
    directory = save_tiny_clip(tmp_path / "clip")
    processor = CLIPProcessor.from_pretrained(directory)
    processor.image_processor.do_center_crop = False  # not the standard recipe
    processor.save_pretrained(directory)
    settings = make_settings(clip_model=str(directory), device_preprocess=True)
    with pytest.raises(RuntimeError, match="--device-preprocess needs the standard CLIP image processor"):
        async with running_app(settings):
            pass


def test_refused_without_a_clip_model(tmp_path):
    with pytest.raises(ValidationError, match="--device-preprocess changes how CLIP reads images"):
        Settings(llava_model=str(tmp_path), device_preprocess=True)
