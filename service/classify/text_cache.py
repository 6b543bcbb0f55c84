"""Bounded LRU of text embeddings keyed by (model, adapter version, template, label).

Only the model worker thread touches it, so it needs no lock. Adapter entries are keyed
by the adapter's content as well as its name and version, so no feature of a deleted or
replaced file is ever served; ``drop_adapter`` frees them when a version is deleted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import torch


class TextKey(NamedTuple):
    model: str
    adapter: str  # "" for zero-shot, else the adapter's uid: "name@version#<content hash>"
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
        self._entries: OrderedDict[TextKey, torch.Tensor] = OrderedDict()
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

    def drop_adapter(self, key: str) -> int:
        """Forget every entry of adapter version ``key`` ("name@version"), whatever its
        content; returns how many. Entries a racing batch adds later carry the old content's
        uid, so they are never served for a new file under the same key."""
        stale = [k for k in self._entries if k.adapter.partition("#")[0] == key]
        for entry in stale:
            del self._entries[entry]
        return len(stale)
