"""The frozen CLIP backbone: loading, preprocessing, and (prompted) features.

Loaded once with ``from_pretrained`` (hub id or local directory), moved once to the
device, eval mode, no gradients. Every forward goes through adapters.prompted_clip,
which with no prompts computes exactly what transformers' CLIPModel computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, cast

import torch
from PIL import Image
from transformers import CLIPModel

from adapters.prompted_clip import encode_image, encode_text
from service.backbones.clip_pixels import ExactClipPixels, resize_target, standard_pixels
from service.backbones.device_pixels import DevicePixels
from service.backbones.loading import BackboneLoadError, load_frozen


@dataclass
class ClipBackbone:
    model_id: str
    model: CLIPModel
    processor: Any  # CLIPProcessor (tokenizer + image processor); transformers types it loosely
    device: torch.device
    dtype: torch.dtype
    # The processor's recipe written directly, when the checkpoint's is the standard one.
    exact_pixels: ExactClipPixels | None = field(default=None, repr=False)
    # Opt-in: resize, crop and normalise on the device (``use_device_preprocessing``).
    device_pixels: DevicePixels | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.exact_pixels is None:
            self.exact_pixels = ExactClipPixels.for_processor(self.processor.image_processor)

    @classmethod
    def load(cls, source: str, device: str = "auto", dtype: str = "auto") -> ClipBackbone:
        model, processor, dev, torch_dtype = load_frozen(source, "clip", CLIPModel, device, dtype)
        if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
            raise BackboneLoadError(f"{source!r} has no CLIP processor (tokenizer + image processor)")
        return cls(source, cast(CLIPModel, model), processor, dev, torch_dtype)

    @property
    def max_text_tokens(self) -> int:
        text_config: Any = self.model.config.text_config
        return int(text_config.max_position_embeddings)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().float().exp().cpu()

    @property
    def draft_min_side(self) -> int:
        """The short side a reduced-size JPEG decode must keep: the processor's resize target."""
        vision_config: Any = self.model.config.vision_config
        return resize_target(self.processor.image_processor, vision_config.image_size)

    def use_device_preprocessing(self) -> None:
        """Resize, crop and normalise on the device from now on (not bit-identical; see
        ``service.backbones.device_pixels``). Only for the standard CLIP recipe."""
        if self.exact_pixels is None:
            raise BackboneLoadError(
                f"--device-preprocess needs the standard CLIP image processor, and {self.model_id!r} has "
                "another one (the log says why); start without --device-preprocess"
            )
        self.device_pixels = DevicePixels(self.exact_pixels, self.device)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Decode thread: (3, H, W) float32 pixels on the CPU, exactly as the checkpoint's
        processor makes them; with device preprocessing, the (H, W, 3) uint8 image instead
        (``pixel_batch`` finishes it)."""
        if self.device_pixels is not None:
            return self.device_pixels.host(image)
        return standard_pixels(image, self.exact_pixels, self.processor.image_processor)

    @cached_property
    def row_shapes(self) -> dict[torch.dtype, tuple[int, ...]]:
        """The rows a front-end process may send (service.frontend.rows), by dtype: finished
        pixels (3, H, W) float32, or with the direct recipe its cropped (H, W, 3) uint8 image."""
        shapes = {torch.float32: tuple(self.preprocess(Image.new("RGB", (97, 89))).shape)}
        if self.exact_pixels is not None:
            shapes[torch.uint8] = (self.exact_pixels.crop_h, self.exact_pixels.crop_w, 3)
        return shapes

    def pixel_batch(self, rows: list[torch.Tensor]) -> torch.Tensor:
        """Model thread: ``preprocess`` outputs (or a front end's rows) -> (B, 3, H, W) model input."""
        if self.device_pixels is not None:
            return self.device_pixels.batch(rows)
        return torch.stack([self._finished(row) for row in rows])

    def _finished(self, row: torch.Tensor) -> torch.Tensor:
        if row.dtype == torch.uint8 and self.exact_pixels is not None:  # a front end's crop
            return self.exact_pixels.normalise(row.numpy())
        return row

    def token_lengths(self, prompts: list[str]) -> list[int]:
        return [len(ids) for ids in self.processor.tokenizer(prompts)["input_ids"]]

    @torch.inference_mode()
    def image_features(
        self,
        pixels: torch.Tensor,  # (B, 3, H, W)
        vision_prompts: torch.Tensor | None = None,  # (B, depth, n_ctx, Dv)
    ) -> torch.Tensor:
        """L2-normalised image embeddings (B, P), float32 on the CPU."""
        pixels = pixels.to(self.device, self.dtype, non_blocking=True)
        if vision_prompts is not None:
            vision_prompts = vision_prompts.to(self.device, self.dtype)
        feats = encode_image(self.model, pixels, vision_prompts).float()
        return (feats / feats.norm(dim=-1, keepdim=True)).cpu()

    @torch.inference_mode()
    def text_features(
        self,
        prompts: list[str],
        text_prompts: torch.Tensor | None = None,  # (N, depth, n_ctx, Dt)
    ) -> torch.Tensor:
        """L2-normalised text embeddings (N, P), float32 on the CPU."""
        tok = self.processor.tokenizer(prompts, padding=True, return_tensors="pt")
        ids = tok["input_ids"].to(self.device)
        mask = tok["attention_mask"].to(self.device)
        if text_prompts is not None:
            text_prompts = text_prompts.to(self.device, self.dtype)
        feats = encode_text(self.model, ids, mask, text_prompts).float()
        return (feats / feats.norm(dim=-1, keepdim=True)).cpu()
