"""Few-shot image-folder data, and the digits folder the training tests share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adapters.data import epoch_order, few_shot_split, scan_folder
from adapters.errors import AdapterValueError

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def render_digits(root: Path, size: int = 64, limit: int | None = None) -> Path:
    """sklearn's 8x8 digits as RGB PNGs, nearest-upscaled (each patch keeps structure,
    MODELS.md), one folder per class named after the digit."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, target) in enumerate(zip(digits.images, digits.target, strict=False)):
        if limit is not None and i >= limit:
            break
        folder = root / DIGIT_NAMES[target]
        folder.mkdir(parents=True, exist_ok=True)
        grey = (image * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        Image.fromarray(grey).resize((size, size), Image.NEAREST).convert("RGB").save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render_digits(tmp_path_factory.mktemp("digits"))


def test_split_is_few_shot_disjoint_and_seeded(digits_dir: Path) -> None:
    split = few_shot_split(digits_dir, shots=16, seed=3, eval_fraction=0.25)
    assert split.classes == sorted(DIGIT_NAMES)
    assert len(split.train) == 160
    assert all(sum(1 for _, y in split.train if y == c) == 16 for c in range(10))
    assert not {p for p, _ in split.train} & {p for p, _ in split.held_out}
    assert 400 < len(split.held_out) < 430  # a quarter of the rest, per class rounded up
    again = few_shot_split(digits_dir, shots=16, seed=3, eval_fraction=0.25)
    assert again == split and again.fingerprint() == split.fingerprint()
    assert few_shot_split(digits_dir, shots=16, seed=4).train != split.train
    assert (
        epoch_order(160, seed=3, epoch=1)
        == epoch_order(160, seed=3, epoch=1)
        != epoch_order(160, seed=3, epoch=2)
    )


def test_bad_folders_say_why(tmp_path: Path) -> None:
    with pytest.raises(AdapterValueError, match="does not exist"):
        scan_folder(tmp_path / "missing")
    (tmp_path / "only").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "only" / "a.png")
    with pytest.raises(AdapterValueError, match="at least two"):
        scan_folder(tmp_path)
    (tmp_path / "other").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "other" / "b.png")
    with pytest.raises(AdapterValueError, match="fewer than 2 shots"):
        few_shot_split(tmp_path, shots=2, seed=0)
