"""Where models run: ``auto`` picks CUDA when torch sees one. Shared by training and serving."""

from __future__ import annotations

import torch

from adapters.errors import DeviceUnavailable


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(device)
