"""What the opt-in pixel shortcuts cost in logits and save in host time: the reduced-size
JPEG decode (``--jpeg-draft``) and the device preprocessing (``--device-preprocess``).

Over the bench photos at two upload sizes, in-process: the exact path (full decode, the
processor's recipe) against each shortcut, followed by the image encoder; logits against
the 10 bench labels. Host ms is what the decode threads spend per image (for the device
path: the decode and the 8-bit copy; its resize runs on the model's device, here the CPU).
Prints one JSON line.

    python -m bench.pixel_effect [--arch tiny|B/32]
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
    from service.backbones.device_pixels import DevicePixels
    from service.http.images import decode_image

    clip = ClipBackbone.load(model_dir, "cpu", "float32")
    assert clip.exact_pixels is not None
    device = DevicePixels(clip.exact_pixels, clip.device)
    text = clip.text_features([f"a photo of a {x}." for x in LABELS_10])  # (10, P)
    side = clip.draft_min_side
    result: dict = {"model": model_dir, "draft_min_side": side}
    for size in ((640, 480), (1920, 1440)):
        jpegs = _jpegs(size)
        host = {
            "exact": lambda d: clip.preprocess(decode_image(d, max_pixels=10**8)),
            "jpeg draft": lambda d: clip.preprocess(decode_image(d, max_pixels=10**8, draft_min_side=side)),
            "device preprocess": lambda d: device.host(decode_image(d, max_pixels=10**8)),
        }
        finish = {"device preprocess": device.batch}
        logits, ms = {}, {}
        for name, fn in host.items():
            rows, ms[name] = _ms(fn, jpegs)
            pixels = finish.get(name, torch.stack)(rows)
            logits[name] = clip.logit_scale * clip.image_features(pixels) @ text.T  # (N, 10)
        entry: dict = {
            "photos": len(jpegs),
            "logit spread (std over labels, mean)": round(float(logits["exact"].std(dim=1).mean()), 4),
            "host ms exact": round(ms["exact"], 2),
        }
        for name in ("jpeg draft", "device preprocess"):
            diff = (logits[name] - logits["exact"]).abs()
            agree = int((logits[name].argmax(1) == logits["exact"].argmax(1)).sum())
            entry[name] = {
                "max |logit diff|": round(float(diff.max()), 4),
                "mean |logit diff|": round(float(diff.mean()), 4),
                "top-1 agreement": f"{agree}/{len(jpegs)}",
                "host ms": round(ms[name], 2),
            }
        result[f"{size[0]}x{size[1]}"] = entry
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="tiny", choices=["tiny", "B/32"])
    a = p.parse_args()
    model = ensure_tiny_clip() if a.arch == "tiny" else ensure_model("B/32")
    print(json.dumps(measure(str(model))))


if __name__ == "__main__":
    main()
