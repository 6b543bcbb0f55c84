"""The weights part of a backbone fingerprint: which checkpoint, not only which shapes.

Two checkpoints of one architecture have the same config fingerprint, yet an adapter
trained on one gives wrong answers on the other. So the fingerprint also carries
``weights``: a digest of a fixed sample of every floating-point tensor of the model
(``SAMPLES`` evenly spaced elements each, with the tensor's name and shape), cheap to
compute at load (a few hundred tiny gathers), however large the model.

A backbone served in float16 or bfloat16 holds its float32 checkpoint's values rounded, so
the digest is taken twice, of the samples rounded to float16 and to bfloat16:
``"f16:<hex>,bf16:<hex>"``. Rounding is idempotent, so a float32 checkpoint and the same
checkpoint served in either half precision share one of the two; two digests agree when
any component they both have is equal.

An adapter may also record ``weights_forced``: the digest of the backbone an admin stored
it for anyway (``force=true``), knowing it was made for other weights.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from adapters.errors import AdapterFormatError, AdapterMismatch

WEIGHTS = "weights"
WEIGHTS_FORCED = "weights_forced"
OPTIONAL_FIELDS = (WEIGHTS, WEIGHTS_FORCED)  # fingerprint fields older adapters lack
SAMPLES = 16
_ROUNDINGS = {"f16": torch.float16, "bf16": torch.bfloat16}
_DIGEST = re.compile(r"(f16|bf16):[0-9a-f]{16}(,(f16|bf16):[0-9a-f]{16})*")


def weights_digest(model: nn.Module) -> str:
    """The digest of ``model``'s weights (see the module docstring)."""
    hashes = {tag: hashlib.sha256() for tag in _ROUNDINGS}
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            if not tensor.is_floating_point() or tensor.numel() == 0:
                continue
            flat = tensor.detach().reshape(-1)
            n, k = flat.numel(), min(SAMPLES, flat.numel())
            index = (torch.arange(k, device=flat.device) * 2 + 1) * n // (2 * k)  # evenly spaced
            sample = flat[index].to("cpu", torch.float32)
            head = f"{name}\0{','.join(map(str, tensor.shape))}\0".encode()
            for tag, dtype in _ROUNDINGS.items():
                hashes[tag].update(head)
                hashes[tag].update(sample.to(dtype).view(torch.int16).numpy().tobytes())
    return ",".join(f"{tag}:{h.hexdigest()[:16]}" for tag, h in hashes.items())


def with_weights(fingerprint: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """A config fingerprint plus the model's weights digest."""
    return {**fingerprint, WEIGHTS: weights_digest(model)}


def check_digest(value: object, key: str) -> None:
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        raise AdapterFormatError(
            f"manifest backbone.{key} must be a weights digest like 'f16:<16 hex>,bf16:<16 hex>'"
        )


def same_weights(a: str, b: str) -> bool:
    parts_a = dict(p.split(":") for p in a.split(","))
    parts_b = dict(p.split(":") for p in b.split(","))
    return any(parts_a[tag] == parts_b[tag] for tag in parts_a.keys() & parts_b.keys())


def check_weights(name: str, made_for: Mapping[str, Any], fingerprint: Mapping[str, Any]) -> None:
    """AdapterMismatch (field "weights") when the adapter was made for other weights than the
    backbone's, unless an admin forced it onto exactly these. An adapter without a weights
    digest (older, shapes-only) passes: it cannot tell."""
    serving, made = fingerprint.get(WEIGHTS), made_for.get(WEIGHTS)
    if serving is None or made is None or same_weights(made, serving):
        return
    forced = made_for.get(WEIGHTS_FORCED)
    if forced is not None and same_weights(forced, serving):
        return
    raise AdapterMismatch(
        f"adapter '{name}' was made for other weights of this architecture (weights expected {serving}, "
        f"got {made}): its answers here would be wrong. An admin who means it may upload it with "
        "force=true",
        field=WEIGHTS, expected=serving, got=made,
    )  # fmt: skip


def fingerprint_kind(made_for: Mapping[str, Any]) -> str:
    """How an adapter's fingerprint pins its backbone, for listings."""
    if WEIGHTS not in made_for:
        return "shapes-only fingerprint"
    return "weights (forced)" if WEIGHTS_FORCED in made_for else "weights"
