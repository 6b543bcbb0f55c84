"""The adapter methods this package knows: one entry per method module.

A new method is a module that declares its ``Method`` beside its math (see
``adapters.method``), one line here, and its place in ``Folded``.
"""

from __future__ import annotations

from typing import Any

from adapters import m2pt, maple
from adapters.errors import AdapterFormatError
from adapters.m2pt import FoldedM2pt
from adapters.maple import FoldedMaple
from adapters.method import Method

Folded = FoldedMaple | FoldedM2pt  # the inference form of any method

METHODS: dict[str, Method[Any]] = {m.name: m for m in (maple.METHOD, m2pt.METHOD)}


def method_named(name: object) -> Method[Any]:
    if not isinstance(name, str) or name not in METHODS:
        raise AdapterFormatError(f"unknown adapter method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]


def method_of(folded: object) -> Method[Any]:
    """The method whose folded form this is."""
    for method in METHODS.values():
        if isinstance(folded, method.folded_type):
            return method
    raise TypeError(f"{type(folded).__name__} is not the folded form of any adapter method")
