"""What an adapter store promises, whatever holds the bytes (a directory, a bucket).

Every store keeps ``<name>/<version>.safetensors`` and makes the same promises:

- version numbers are never reused, not after deletes and not by two writers (replicas)
  at once: a number is claimed atomically before its bytes are written, and a claim
  outlives the version it named, so ``name@3`` always means one content;
- a version is whole or absent (no reader sees a half-written one), and a write that
  fails stores nothing;
- ``read`` returns at most ``max_bytes`` bytes (the caller parses them with
  ``adapters.format.load_adapter``, which checks the tensors' sha256 on every load);
- listings may lag other writers by the store's ``refresh_s`` (0 for a directory, whose
  listing is the directory itself), never this process's own writes.

Aliases (named pointers to a version) belong beside the versions of a name; a store
implements them with the same primitive it claims versions with (an exclusive create)
plus an atomic replace of one small object.

Methods block: the registry calls them from its I/O threads, never on the event loop.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from service.errors import StoreMisconfigured, StoreUnavailable

if TYPE_CHECKING:
    from service.settings import Settings

log = logging.getLogger("promptswap.registry")

SUFFIX = ".safetensors"
__all__ = ["StoreMisconfigured", "StoreUnavailable"]  # the store's domain errors (service.errors)


class StoreFull(OSError):
    """The store refused the write for lack of space (ENOSPC / EDQUOT); it is unchanged."""


class VersionGone(Exception):
    """The version was deleted between listing it and reading it."""


class VersionTaken(Exception):
    """``put_exact``: that version number is already claimed in the target store."""


@dataclass(frozen=True)
class StoredVersion:
    name: str
    version: int
    size: int
    mtime: float
    # Which content, not which name: a file's (inode, mtime ns, size), an object's (etag, size).
    file_id: Hashable = (0, 0, 0)
    path: Path | None = None  # the file, for a directory store

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"


class VersionStore(Protocol):
    """The store the registry and the admin API use (see the module docstring)."""

    location: str  # where it is, for logs and errors: a path or s3://bucket/prefix
    refresh_s: float  # how far behind other writers a listing may be

    def names(self) -> list[str]: ...

    def versions(self, name: str) -> list[StoredVersion]: ...

    def get(self, name: str, version: int | None = None) -> StoredVersion | None: ...

    def put(self, name: str, encode: Callable[[int], bytes]) -> StoredVersion:
        """Store the next version of ``name``; ``encode(version)`` gives its bytes."""
        ...

    def put_exact(self, name: str, version: int, data: bytes) -> StoredVersion:
        """Store ``data`` as exactly ``name@version`` (copying a store); ``VersionTaken``
        when that number was ever claimed here."""
        ...

    def delete(self, name: str, version: int | None = None) -> list[StoredVersion]: ...

    def read(self, stored: StoredVersion, max_bytes: int) -> bytes:
        """The version's bytes; ``VersionGone`` if deleted, ``AdapterTooLarge`` past ``max_bytes``."""
        ...

    def health(self) -> str | None:
        """None when the store answers, else why not (for /readyz)."""
        ...

    # Aliases (named pointers to a version of a name; see store.AdapterStore).
    def aliases(self, name: str) -> dict[str, int]: ...

    def alias(self, name: str, alias: str) -> int | None: ...

    def set_alias(self, name: str, alias: str, version: int) -> int | None: ...

    def delete_alias(self, name: str, alias: str) -> int | None: ...


def raise_if_full(exc: OSError) -> None:
    """A full disk or quota becomes ``StoreFull`` (the API's 507)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise StoreFull(exc.errno, "no space left for the adapter store") from exc


def open_store(settings: Settings) -> VersionStore:
    """The store ``settings`` name: the bucket of ``--adapter-store``, else ``--adapter-dir``."""
    if settings.adapter_store is None:
        from service.registry.store import AdapterStore

        return AdapterStore(settings.adapter_dir)
    from service.registry.s3_store import S3Store

    store = S3Store(
        settings.adapter_store,
        refresh_s=settings.store_refresh_s,
        timeout_s=settings.store_timeout_s,
        attempts=settings.store_attempts,
        cache_bytes=settings.store_cache_bytes,
        retry_after_s=settings.retry_after_unavailable_s,
    )
    try:
        store.check()
    except StoreUnavailable as exc:  # start anyway: zero-shot serves, /readyz says why
        log.warning("starting without the adapter store for now: %s", exc)
    return store
