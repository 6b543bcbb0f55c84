"""What an adapter method tells the file format and the tools about itself.

Each method module (``adapters.maple``, ``adapters.m2pt``) declares one ``Method`` beside
its math: the backbone it runs on and that backbone's fingerprint, the tensors its file
holds and their shapes, and how its folded form becomes tensors and back.
``adapters.methods`` lists them; the container (``adapters.format``) only asks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

import torch
from transformers import PretrainedConfig

from adapters.errors import AdapterMismatch, AdapterValueError

F = TypeVar("F")


class Fit(NamedTuple):
    """How a folded adapter must fit a backbone: each width equal, each depth within its layers."""

    what: str  # how a message names the tensors ("prompts")
    widths: tuple[tuple[str, int], ...]  # (fingerprint field, the adapter's width)
    depths: tuple[tuple[str, int], ...]  # (fingerprint field with a layer count, the adapter's depth)


@dataclass(frozen=True)
class Method(Generic[F]):
    name: str  # the manifest's "method"
    arch: str  # the backbone arch it runs on (the fingerprint's "arch")
    config_type: type[PretrainedConfig]  # that backbone's transformers config
    fingerprint: Callable[[Any], dict[str, Any]]  # backbone config -> what an adapter must agree on
    fingerprint_fields: Mapping[str, type]  # the fingerprint's fields and their types
    folded_type: type[F]
    tensors: tuple[str, ...]  # exactly the tensors a file holds, in display order
    shape: Callable[[F], dict[str, int]]  # the hyperparameters the tensor shapes follow from
    check_hyperparameters: Callable[[Mapping[str, Any], Mapping[str, Any]], None]  # (hp, backbone)
    expected_shapes: Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, list[int]]]
    to_tensors: Callable[[F], dict[str, torch.Tensor]]
    from_tensors: Callable[[Mapping[str, torch.Tensor]], F]
    fit: Callable[[F], Fit]

    def check_fit(self, name: str, folded: F, fingerprint: Mapping[str, Any]) -> None:
        """AdapterMismatch unless each width equals the backbone's and each depth fits its layers."""
        what, widths, depths = self.fit(folded)
        for key, got in widths:
            expected = fingerprint.get(key)
            if expected != got:
                raise AdapterMismatch(
                    f"adapter '{name}' {what} have {key} {got}, the backbone has {expected}",
                    field=key, expected=expected, got=got,
                )  # fmt: skip
        for key, depth in depths:
            layers = fingerprint.get(key)
            if not isinstance(layers, int) or depth > layers:
                raise AdapterMismatch(
                    f"adapter '{name}' prompt depth {depth} exceeds the backbone's {key} {layers}",
                    field=key, expected=layers, got=depth,
                )  # fmt: skip


def is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_positive_ints(hp: Mapping[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        value = hp.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise AdapterValueError(f"hyperparameters.{key} must be an integer >= 1, got {value!r}")
