"""What the opt-in reduced-size JPEG decode (``--jpeg-draft``) costs in logits and saves in time.

Over the bench photos at two upload sizes, in-process: full decode vs the DCT-scaled
decode, each followed by the service's preprocessing and image encoder; logits against
the 10 bench labels. Prints one JSON line.

    python -m bench.draft_effect [--arch tiny|B/32]
"""

from __future__ import annotations

import argparse
import io
import json
import time

import torch
from PIL import Image

from .models import ensure_model, ensure_tiny_clip
from .payloads import LABELS_10, PHOTOS


def _jpegs(size: tuple[int, int]) -> list[bytes]:
    from skimage import data

    out = []
    for name in PHOTOS:
        image = Image.fromarray(getattr(data, name)()).convert("RGB").resize(size, Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _ms(fn, items) -> tuple[list, float]:
    started = time.perf_counter()
    out = [fn(x) for x in items]
    return out, 1000 * (time.perf_counter() - started) / len(items)


def measure(model_dir: str) -> dict:
    from service.backbones.clip import ClipBackbone
    from service.http.images import decode_image

    clip = ClipBackbone.load(model_dir, "cpu", "float32")
    text = clip.text_features([f"a photo of a {x}." for x in LABELS_10])  # (10, P)
    side = clip.draft_min_side
    result: dict = {"model": model_dir, "draft_min_side": side}
    for size in ((640, 480), (1920, 1440)):
        jpegs = _jpegs(size)
        logits, ms = {}, {}
        for draft in (None, side):
            pixels, ms[draft] = _ms(
                lambda d, draft=draft: clip.preprocess(
                    decode_image(d, max_pixels=10**8, draft_min_side=draft)
                ),
                jpegs,
            )
            logits[draft] = clip.logit_scale * clip.image_features(torch.stack(pixels)) @ text.T  # (N, 10)
        diff = (logits[side] - logits[None]).abs()
        result[f"{size[0]}x{size[1]}"] = {
            "photos": len(jpegs),
            "max |logit diff|": round(float(diff.max()), 4),
            "mean |logit diff|": round(float(diff.mean()), 4),
            "logit spread (std over labels, mean)": round(float(logits[None].std(dim=1).mean()), 4),
            "top-1 agreement": f"{int((logits[side].argmax(1) == logits[None].argmax(1)).sum())}/{len(jpegs)}",
            "decode+preprocess ms full": round(ms[None], 2),
            "decode+preprocess ms draft": round(ms[side], 2),
        }
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="tiny", choices=["tiny", "B/32"])
    a = p.parse_args()
    model = ensure_tiny_clip() if a.arch == "tiny" else ensure_model("B/32")
    print(json.dumps(measure(str(model))))


if __name__ == "__main__":
    main()
