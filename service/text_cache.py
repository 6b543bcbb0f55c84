"""Bounded LRU of text embeddings keyed by (model, adapter version, template, label).

Only the model worker thread touches it, so it needs no lock. Entries of an adapter
version are dropped with that version (``drop_adapter``), so no stale feature of a
deleted or replaced adapter is ever served.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import NamedTuple

import torch


class TextKey(NamedTuple):
    model: str
    adapter: str  # "" for zero-shot, else "name@version"
    template: str
    label: str


class TextCache:
    def __init__(
        self,
        max_entries: int,
        on_hit: Callable[[int], None] | None = None,
        on_miss: Callable[[int], None] | None = None,
    ) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._on_hit = on_hit or (lambda n: None)
        self._on_miss = on_miss or (lambda n: None)

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, keys: list[TextKey]) -> tuple[dict[TextKey, torch.Tensor], list[TextKey]]:
        """Split ``keys`` into cached embeddings and the keys still to compute."""
        found: dict[TextKey, torch.Tensor] = {}
        missing: list[TextKey] = []
        for key in keys:
            value = self._entries.get(key)
            if value is None:
                missing.append(key)
            else:
                self._entries.move_to_end(key)
                found[key] = value
        self._on_hit(len(found))
        self._on_miss(len(missing))
        return found, missing

    def put(self, key: TextKey, value: torch.Tensor) -> None:
        if self.max_entries == 0:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def drop_adapter(self, adapter: str) -> int:
        """Forget every entry of one adapter version; returns how many."""
        stale = [k for k in self._entries if k.adapter == adapter]
        for key in stale:
            del self._entries[key]
        return len(stale)
