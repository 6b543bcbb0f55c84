"""Opt-in (``--device-preprocess``): CLIP's resize, crop and normalise on the model's device.

The decode threads hand over the decoded image as it is, 8-bit (H, W, 3), in pinned
memory on CUDA so the copy to the device is asynchronous; the model thread resizes all
images of one size in one call (torch's bicubic with antialiasing, the filter Pillow
uses), crops the centre and normalises, on the device. That takes the largest share
of a classify request's host CPU off the host (bench/RESULTS.md, host cost).

Not bit-identical to the processor: torch's float resize rounded to 8 bits differs from
Pillow's fixed-point one by a level here and there, so logits move slightly
(``python -m bench.pixel_effect``; README). Off by default.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from PIL import Image
from torch.nn.functional import interpolate

from service.backbones.clip_pixels import ExactClipPixels


class DevicePixels:
    def __init__(self, recipe: ExactClipPixels, device: torch.device) -> None:
        if recipe.resample != Image.Resampling.BICUBIC:
            raise ValueError(f"the processor resizes with {recipe.resample.name}; the device path is bicubic")
        self.recipe = recipe
        self.device = device
        self._mean = torch.tensor(recipe.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(recipe.std, device=device).view(1, 3, 1, 1)

    def host(self, image: Image.Image) -> torch.Tensor:
        """Decode thread: the RGB image as (H, W, 3) uint8, pinned when the device is CUDA."""
        pixels = torch.from_numpy(np.array(image.convert("RGB")))  # a copy numpy owns (writable)
        return pixels.pin_memory() if self.device.type == "cuda" else pixels

    def batch(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Model thread: (B, 3, crop_h, crop_w) float32 on the device, rows in order."""
        r = self.recipe
        out = torch.empty(len(images), 3, r.crop_h, r.crop_w, device=self.device)
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            by_size[(image.shape[0], image.shape[1])].append(i)
        for (height, width), rows in by_size.items():
            # each copy is asynchronous from pinned memory; the stack happens on the device
            x = torch.stack([images[i].to(self.device, non_blocking=True) for i in rows])
            x = x.permute(0, 3, 1, 2).float()  # (n, 3, H, W)
            new_w, new_h = r.resized_size(width, height)
            x = interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
            top, left = (new_h - r.crop_h) // 2, (new_w - r.crop_w) // 2
            x = (
                x[:, :, top : top + r.crop_h, left : left + r.crop_w].round().clamp(0, 255)
            )  # 8-bit, as Pillow
            out[torch.tensor(rows, device=self.device)] = (x * r.rescale_factor - self._mean) / self._std
        return out
