"""Where a classify request's time goes.

``stage_times``: in-process timings of each stage the service runs per request (JPEG
decode, the checkpoint's image processor, image encoder per row at batch 16/32, text
embeddings for 10 labels) plus the cheaper alternatives proposed in RESULTS.md.
``pyspy_during``: samples the running server with py-spy while load runs and groups
the on-CPU samples by stage.
``python -m bench.profile --model DIR --dtype float32`` prints the stage timings as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .models import OUT
from .payloads import LABELS_10, photos

CATEGORIES = (  # first match wins, checked on the whole stack
    ("model: image encoder", ("encode_image",)),
    ("model: text encoder", ("encode_text", "text_features")),
    ("JPEG decode", ("decode_image",)),
    ("HF image processor", ("preprocess (service/backbones",)),
    ("multipart parsing", ("multipart", "parse_classify", "form (")),
    ("batch handler (rest)", ("classify.py",)),
)


def _best_ms(fn: Callable[[], object], repeat: int) -> float:
    """Median of ``repeat`` timed calls, in ms."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def fast_preprocess(image: Image.Image, size: int, mean: list[float], std: list[float]) -> torch.Tensor:
    """Resize the short side to ``size`` (bicubic), centre-crop, normalise: CLIP's recipe
    in one pass, without the generic processor's per-call validation and conversions."""
    w, h = image.size
    scale = size / min(w, h)
    # int(), as transformers computes the long side: a one-pixel difference shifts the crop.
    image = image.resize((max(size, int(w * scale)), max(size, int(h * scale))), Image.Resampling.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = np.asarray(image, dtype=np.float32) * (1 / 255)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


def draft_decode(data: bytes, size: int) -> Image.Image:
    """DCT-scaled JPEG decode to the smallest scale >= ``size`` on the short side."""
    image = Image.open(io.BytesIO(data))
    w, h = image.size
    scale = min(w, h) / size
    image.draft("RGB", (max(1, int(w / scale)), max(1, int(h / scale))))
    return image.convert("RGB")


def stage_times(model_dir: str, dtype: str) -> dict:
    from service.backbones.clip import ClipBackbone
    from service.http.images import decode_image

    clip = ClipBackbone.load(model_dir, "cpu", dtype)
    datas = [d for _, d in photos()]
    ip = clip.processor.image_processor
    size = ip.crop_size["height"]
    out: dict[str, float] = {}
    out["jpeg decode 640x480 ms"] = float(
        np.mean([_best_ms(lambda d=d: decode_image(d, max_pixels=10**8), 5) for d in datas])
    )
    images = [decode_image(d, max_pixels=10**8) for d in datas]
    out["HF image processor ms"] = float(
        np.mean([_best_ms(lambda im=im: clip.preprocess(im), 5) for im in images])
    )
    out["direct resize+crop+normalise ms"] = float(
        np.mean(
            [
                _best_ms(lambda im=im: fast_preprocess(im, size, ip.image_mean, ip.image_std), 5)
                for im in images
            ]
        )
    )
    out["direct vs HF max abs diff"] = float(
        max(
            (fast_preprocess(im, size, ip.image_mean, ip.image_std) - clip.preprocess(im)).abs().max()
            for im in images
        )
    )
    out["draft decode ms"] = float(np.mean([_best_ms(lambda d=d: draft_decode(d, size), 5) for d in datas]))
    threads = torch.get_num_threads()
    out["torch threads"] = threads
    batch = 16
    pixels = torch.stack([clip.preprocess(images[i % len(images)]) for i in range(batch)])
    vision = 0.02 * torch.randn(batch, 9, 2, clip.model.config.vision_config.hidden_size)
    clip.image_features(pixels[:2])
    out["image encoder ms/image @ batch 1"] = _best_ms(lambda: clip.image_features(pixels[:1]), 3)
    with torch.inference_mode():
        hf = lambda: clip.model.get_image_features(pixel_values=pixels.to(clip.dtype))  # noqa: E731
        out["HF get_image_features ms/image @ batch 16"] = _best_ms(hf, 1) / batch
    out["service image_features ms/image @ batch 16"] = (
        _best_ms(lambda: clip.image_features(pixels), 1) / batch
    )
    out["service image_features + MaPLe prompts ms/image @ batch 16"] = (
        _best_ms(lambda: clip.image_features(pixels, vision), 1) / batch
    )
    prompts = [f"a photo of a {label}." for label in LABELS_10]
    text = 0.02 * torch.randn(len(prompts), 9, 2, clip.model.config.text_config.hidden_size)
    clip.text_features(prompts)
    out["text encoder ms for 10 labels"] = _best_ms(lambda: clip.text_features(prompts), 3)
    out["text encoder + MaPLe prompts ms for 10 labels"] = _best_ms(
        lambda: clip.text_features(prompts, text), 3
    )
    many = prompts * 16  # 16 adapters' label sets in one forward, as a cross-adapter batch would
    out["text encoder ms for 160 prompts in one forward"] = _best_ms(
        lambda: clip.text_features(many, text.repeat(16, 1, 1, 1)), 1
    )
    torch.set_num_threads(1)
    out["service image_features ms/image @ batch 16, 1 thread"] = (
        _best_ms(lambda: clip.image_features(pixels), 1) / batch
    )
    torch.set_num_threads(threads)
    return out


def pyspy_during(server, work: Callable[[], object], name: str = "pyspy-classify") -> dict | None:
    """Sample ``server``'s process with py-spy while ``work()`` runs; summary by stage."""
    exe = shutil.which("py-spy") or str(Path(__import__("sys").executable).parent / "py-spy")
    if not Path(exe).exists():
        return None
    raw = OUT / f"{name}.txt"
    proc = subprocess.Popen(
        [
            exe,
            "record",
            "--pid",
            str(server.proc.pid),
            "--rate",
            "50",
            "--format",
            "raw",
            "--output",
            str(raw),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # attached
    try:
        work()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if not raw.exists():
        return None
    summary = summarise(raw)
    (OUT / f"{name}-summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def summarise(raw: Path) -> dict:
    counts: Counter = Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        label = next(
            (c for c, keys in CATEGORIES if any(k in stack for k in keys)),
            "other (event loop, HTTP, uvicorn, threads)",
        )
        counts[label] += int(n)
    total = sum(counts.values()) or 1
    return {"samples": total, "share %": {k: round(100 * v / total, 1) for k, v in counts.most_common()}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="float32")
    a = p.parse_args()
    print(json.dumps(stage_times(a.model, a.dtype)))


if __name__ == "__main__":
    main()
