"""Image-folder data for few-shot training: one sub-folder per class, folder name = label.

The split is a pure function of the sorted file list and the seed, so a resumed run
sees exactly the images (and, per epoch, the order) an uninterrupted run saw.
Images are read as the service reads uploads (EXIF orientation, RGB) and preprocessed
by the backbone's own image processor, so training, evaluation and serving see the
same pixels.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps

from adapters.errors import AdapterValueError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}


@dataclass(frozen=True)
class Split:
    classes: list[str]  # label per class index, sorted folder names
    train: list[tuple[Path, int]]
    held_out: list[tuple[Path, int]]

    def fingerprint(self) -> str:
        """Identifies the exact training files, so a resume on changed data is refused."""
        h = hashlib.sha256()
        for path, label in self.train:
            h.update(f"{path.parent.name}/{path.name}\0{label}\n".encode())
        return h.hexdigest()[:16]


def scan_folder(root: str | Path) -> tuple[list[str], list[list[Path]]]:
    """Classes (sorted sub-folder names) and each class's image files, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise AdapterValueError(f"data directory {str(root)!r} does not exist")
    classes, files = [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = sorted(p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if images:
            classes.append(sub.name)
            files.append(images)
    if len(classes) < 2:
        raise AdapterValueError(
            f"{str(root)!r} needs at least two class sub-folders with images, found {classes}"
        )
    return classes, files


def few_shot_split(root: str | Path, *, shots: int, seed: int, eval_fraction: float = 1.0) -> Split:
    """``shots`` random images per class for training; ``eval_fraction`` of the rest held out."""
    if shots < 1:
        raise AdapterValueError(f"shots must be >= 1, got {shots}")
    if not 0.0 <= eval_fraction <= 1.0:
        raise AdapterValueError(f"eval fraction must be in [0, 1], got {eval_fraction}")
    classes, files = scan_folder(root)
    g = torch.Generator().manual_seed(seed)
    train: list[tuple[Path, int]] = []
    held_out: list[tuple[Path, int]] = []
    for label, images in enumerate(files):
        if len(images) < shots:
            raise AdapterValueError(
                f"class {classes[label]!r} has {len(images)} images, fewer than {shots} shots"
            )
        order = torch.randperm(len(images), generator=g).tolist()
        train += [(images[i], label) for i in order[:shots]]
        rest = order[shots:]
        held_out += [(images[i], label) for i in rest[: math.ceil(len(rest) * eval_fraction)]]
    return Split(classes, train, held_out)


def load_rgb(path: Path) -> Image.Image:
    """As the service decodes an upload: EXIF orientation applied, first frame, RGB."""
    with Image.open(path) as image:
        image.load()
        return ImageOps.exif_transpose(image).convert("RGB")


class PixelCache:
    """Preprocessed pixels per file, computed once: few-shot sets are small, and decoding
    every image every epoch would cost more than the tiny forward passes."""

    def __init__(self, preprocess: Callable[[Image.Image], torch.Tensor], max_bytes: int = 2 << 30) -> None:
        self.preprocess = preprocess  # PIL image -> (3, H, W) float32
        self.max_bytes = max_bytes  # past it, images are decoded again each time they are used
        self._pixels: dict[Path, torch.Tensor] = {}
        self._bytes = 0

    def batch(self, items: Sequence[tuple[Path, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) pixels and (B,) labels."""
        rows = []
        for path, _ in items:
            pixels = self._pixels.get(path)
            if pixels is None:
                pixels = self.preprocess(load_rgb(path))
                if self._bytes + pixels.nbytes <= self.max_bytes:
                    self._pixels[path] = pixels
                    self._bytes += pixels.nbytes
            rows.append(pixels)
        pixels = torch.stack(rows)
        return pixels, torch.tensor([label for _, label in items], dtype=torch.long)


def epoch_order(n: int, *, seed: int, epoch: int) -> list[int]:
    """The training order of one epoch: a function of (seed, epoch) only, so resuming at
    any step needs no generator state."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()
