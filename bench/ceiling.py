"""The raw model ceiling: image-encoder forwards in-process, no HTTP, inputs preprocessed.

``python -m bench.ceiling --model DIR --dtype float32 --batch 32 --seconds 10`` prints
one JSON line: images per second of ``CLIPModel.get_image_features`` at that batch; with
``--end-to-end`` also ``end_to_end_images_per_s``: the in-process limit of a request path, each batch's JPEG
decode and exact preprocessing (the service's ``ClipBackbone.preprocess``, one thread)
followed by its forward.
"""

from __future__ import annotations

import argparse
import io
import json
import time

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, CLIPModel

from .payloads import photos


def pixel_batch(model_dir: str, batch: int) -> torch.Tensor:
    processor = AutoImageProcessor.from_pretrained(model_dir)
    images = [Image.open(io.BytesIO(data)).convert("RGB") for _, data in photos()]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    return pixels[torch.arange(batch) % len(images)]  # (B, 3, 224, 224)


@torch.inference_mode()
def measure(
    model_dir: str,
    dtype: str,
    batch: int,
    seconds: float,
    min_batches: int = 1,
    with_end_to_end: bool = False,
) -> dict:
    model = CLIPModel.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    pixels = pixel_batch(model_dir, batch).to(model.dtype)
    model.get_image_features(pixel_values=pixels[:2])  # warm-up (kernels, allocator)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_batches or time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        model.get_image_features(pixel_values=pixels)
        times.append(time.perf_counter() - t0)
    total = sum(times)
    result = {
        "images_per_s": batch * len(times) / total,
        "batch": batch,
        "batches": len(times),
        "batch_s_median": sorted(times)[len(times) // 2],
        "threads": torch.get_num_threads(),
    }
    if with_end_to_end:
        result["end_to_end_images_per_s"] = end_to_end(model_dir, model, batch, seconds)
    return result


@torch.inference_mode()
def end_to_end(model_dir: str, model: CLIPModel, batch: int, seconds: float) -> float:
    from service.backbones.clip import ClipBackbone
    from service.http.images import decode_image

    clip = ClipBackbone(
        model_dir, model, AutoProcessor.from_pretrained(model_dir), torch.device("cpu"), model.dtype
    )
    jpegs = [data for _, data in photos()]
    chosen = [jpegs[i % len(jpegs)] for i in range(batch)]
    images, started = 0, time.perf_counter()
    while images == 0 or time.perf_counter() - started < seconds:
        pixels = torch.stack([clip.preprocess(decode_image(d, max_pixels=10**8)) for d in chosen])
        model.get_image_features(pixel_values=pixels.to(model.dtype))
        images += batch
    return images / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--end-to-end", action="store_true", help="also decode + preprocess + encode")
    a = p.parse_args()
    print(json.dumps(measure(a.model, a.dtype, a.batch, a.seconds, with_end_to_end=a.end_to_end)))


if __name__ == "__main__":
    main()
