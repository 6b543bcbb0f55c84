"""A bounded in-memory LRU of downloaded adapter bytes, each checked by sha256 when read.

A bucket store downloads a version once; a reload after the device cache evicted it is
then a memory copy, not a round trip. Entries are keyed by content (key and etag), so a
replaced object is never served from here, and a hit whose bytes no longer hash to what
was stored is dropped and counted as a miss.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Hashable


class ByteCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[bytes, str]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # the store is called from several I/O threads
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: Hashable) -> bytes | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
        if entry is not None and hashlib.sha256(entry[0]).hexdigest() == entry[1]:
            self.hits += 1
            return entry[0]
        if entry is not None:
            self.discard(key)  # changed in memory: never serve it
        self.misses += 1
        return None

    def put(self, key: Hashable, data: bytes, sha256: str) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= len(old[0])
            self._entries[key] = (data, sha256)
            self._bytes += len(data)
            while self._bytes > self.max_bytes:
                _, (evicted, _) = self._entries.popitem(last=False)
                self._bytes -= len(evicted)

    def discard(self, key: Hashable) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= len(old[0])
