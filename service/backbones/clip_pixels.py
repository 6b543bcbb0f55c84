"""CLIP's image recipe written directly: short-side resize, centre crop, rescale + normalise.

transformers' PIL image processor runs the same three steps through generic array
plumbing (channel moves, float64 copies, validation per call). Here each step is the
one Pillow or numpy operation it reduces to, with the processor's own arithmetic:

- resize: the long side is ``int(short_target * long / short)``, Pillow's filter;
- crop: ``top = (h - crop_h) // 2``, ``left = (w - crop_w) // 2``;
- rescale then normalise: ``float32(float64(v) * factor)``, then ``(x - mean) / std`` in
  float32; both depend on the 8-bit value and the channel alone, so they are one
  lookup table per channel whose entries are computed with exactly those operations.

The result is bit-identical to the processor's. ``ExactClipPixels.for_processor``
builds one only for the standard CLIP configuration (every other setting at its
default) and checks the identity on a probe image at load; anything else keeps the
processor, so no checkpoint ever gets different pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image

log = logging.getLogger("promptswap.backbones")

# Settings the recipe reads; every other entry of the processor's config must be its default.
_PARAMETERS = ("size", "crop_size", "resample", "rescale_factor", "image_mean", "image_std")


class ExactClipPixels:
    """(3, crop_h, crop_w) float32 pixels from an RGB image, equal to the processor's."""

    def __init__(
        self,
        shortest_edge: int,
        crop: tuple[int, int],  # (height, width)
        resample: Image.Resampling,
        rescale_factor: float,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        self.shortest_edge = shortest_edge
        self.crop_h, self.crop_w = crop
        self.resample = resample
        self.rescale_factor, self.mean, self.std = rescale_factor, mean, std
        values = np.arange(256, dtype=np.uint8)
        rescaled = (values.astype(np.float64) * rescale_factor).astype(np.float32)  # (256,)
        mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        self._lut = (rescaled[None, :] - mean32[:, None]) / std32[:, None]  # (3, 256) float32

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the short-side resize, rounded as transformers rounds."""
        size = self.shortest_edge
        if width <= height:
            return size, int(size * height / width)
        return int(size * width / height), size

    def accepts(self, image: Image.Image) -> bool:
        """RGB without a transparency key: the processor would composite that onto white."""
        return image.mode == "RGB" and "transparency" not in image.info

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalise(self.crop(image))

    def crop(self, image: Image.Image) -> np.ndarray:
        """Resize and crop: the (crop_h, crop_w, 3) uint8 pixels that ``normalise`` finishes
        (a quarter of the float32 pixels' bytes, for a front end to send)."""
        resized = np.asarray(image.resize(self.resized_size(*image.size), self.resample))
        return np.ascontiguousarray(self._centre(resized))

    def from_resized(self, rgb: np.ndarray) -> torch.Tensor:
        """Crop and normalise an already resized (H, W, 3) uint8 array."""
        return self.normalise(self._centre(rgb))

    def _centre(self, rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        top, left = (h - self.crop_h) // 2, (w - self.crop_w) // 2
        return rgb[top : top + self.crop_h, left : left + self.crop_w]  # (h, w, 3) view

    def normalise(self, crop: np.ndarray) -> torch.Tensor:
        """(crop_h, crop_w, 3) uint8 -> (3, crop_h, crop_w) float32, as the processor rescales
        and normalises."""
        out = np.empty((3, self.crop_h, self.crop_w), np.float32)
        for c in range(3):
            np.take(self._lut[c], crop[..., c], out=out[c])
        return torch.from_numpy(out)

    @classmethod
    def for_processor(cls, image_processor: Any) -> ExactClipPixels | None:
        """The direct recipe when ``image_processor`` is a standard CLIP one, else None
        (the reason is logged): the caller then keeps the processor."""
        reason = _nonstandard(image_processor)
        if reason is None:
            config = image_processor.to_dict()
            pixels = cls(
                config["size"]["shortest_edge"],
                (config["crop_size"]["height"], config["crop_size"]["width"]),
                Image.Resampling(config["resample"]),
                float(config["rescale_factor"]),
                tuple(config["image_mean"]),  # type: ignore[arg-type]
                tuple(config["image_std"]),  # type: ignore[arg-type]
            )
            reason = pixels._differs_on_probe(image_processor)
            if reason is None:
                log.info("image preprocessing: the direct CLIP recipe (equal to the processor's)")
                return pixels
        log.info("image preprocessing: the checkpoint's processor (%s)", reason)
        return None

    def _differs_on_probe(self, image_processor: Any) -> str | None:
        rng = np.random.default_rng(0)
        for width, height in ((257, 199), (181, 263)):  # odd sizes, both orientations
            probe = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
            want = image_processor(images=probe, return_tensors="pt")["pixel_values"][0]
            if not torch.equal(self(probe), want):
                return "the direct recipe differs from it on a probe image"
        return None


def _nonstandard(image_processor: Any) -> str | None:
    """Why the direct recipe cannot stand in for ``image_processor``, or None if it can."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if type(image_processor) is not CLIPImageProcessorPil:
        # The torchvision backend resizes with torch's kernels, not Pillow's.
        return f"{type(image_processor).__name__} is not transformers' PIL CLIP image processor"
    config = image_processor.to_dict()
    default = CLIPImageProcessorPil().to_dict()
    for key in sorted(set(config) | set(default)):
        if key not in _PARAMETERS and config.get(key) != default.get(key):
            return f"{key}={config.get(key)!r} is not the default {default.get(key)!r}"
    size, crop = config.get("size"), config.get("crop_size")
    if not (isinstance(size, Mapping) and set(size) == {"shortest_edge"}):
        return f"size={size!r} is not a shortest-edge resize"
    if not (isinstance(crop, Mapping) and set(crop) == {"height", "width"}):
        return f"crop_size={crop!r} is not a height and width"
    if size["shortest_edge"] < max(crop["height"], crop["width"]):
        return "the crop is larger than the resized short side (the processor pads)"
    if len(config.get("image_mean") or ()) != 3 or len(config.get("image_std") or ()) != 3:
        return "image_mean/image_std are not three channels"
    try:
        Image.Resampling(int(config.get("resample")))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return f"resample={config.get('resample')!r} is not a Pillow filter"
    return None


def standard_pixels(image: Image.Image, exact: ExactClipPixels | None, image_processor: Any) -> torch.Tensor:
    """(3, H, W) float32 pixels as ``image_processor`` makes them: the direct recipe where it
    applies. Needs the processor alone, so a front-end process does it without the model."""
    if exact is not None and exact.accepts(image):
        return exact(image)
    return image_processor(images=image, return_tensors="pt")["pixel_values"][0]


def resize_target(image_processor: Any, image_size: int) -> int:
    """The short side the processor resizes to (``image_size``, the model's, if it says none):
    what a reduced-size JPEG decode must keep."""
    size = getattr(image_processor, "size", None) or {}
    side = size.get("shortest_edge") or max(size.get("height") or 0, size.get("width") or 0)
    return int(side or image_size)
