"""The adapter store: versioned adapter files in one directory, written atomically.

Layout: ``<root>/<name>/<version>.safetensors`` (version 1, 2, ...). A write goes to
``<root>/.tmp/``, is fsynced, then hard-linked to its final name, which fails if that
name exists: two writers (two replicas on one shared volume) can never overwrite each
other's version, and no reader ever sees a half-written file. A failed write leaves the
store as it was. Version numbers are never reused, even after deletes or by two writers at
once: a writer first claims its number by creating ``<name>/.claimed/<version>`` with
O_EXCL (atomic on one host and on NFSv3+), and a claim outlives its file, so ``name@3``
always means one content. Names are checked against ``[a-z0-9][a-z0-9._-]{0,63}`` before
any path is built, so no name can leave the root.

Aliases: ``<name>/.aliases/<alias>`` holds a version number as text. Setting one writes a
temp file, fsyncs it and renames it over the old one (atomic: a reader sees the old
version or the new one, never neither), so every replica sharing the store sees the move
on its next read. Alias changes and version deletes of one name hold ``<name>/.lock``
(``flock``), so no alias can come to point at a version being deleted, and no version an
alias points at is deleted.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from adapters.errors import AdapterFormatError, AdapterTooLarge
from adapters.format import check_name
from service.registry.store_protocol import (
    SUFFIX,
    StoredVersion,
    StoreFull,
    VersionGone,
    VersionTaken,
    raise_if_full,
)

__all__ = ["AdapterStore", "StoredVersion", "StoreFull", "SUFFIX"]

CLAIMED = ".claimed"
ALIASES = ".aliases"
LOCK = ".lock"
ALIAS_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
LATEST = "latest"  # reserved: always the highest version
DEFAULT = "default"  # when set, what the plain name means
STALE_TEMP_S = 3600.0  # a temp file this old belongs to a writer that died
_VERSION_FILE = re.compile(r"([1-9][0-9]{0,8})\.safetensors")


class VersionAliased(Exception):
    """A delete would remove versions that aliases point at; nothing was deleted."""

    def __init__(self, name: str, aliases: dict[str, int]) -> None:
        self.name, self.aliases = name, aliases
        named = ", ".join(f"{a} -> {name}@{v}" for a, v in sorted(aliases.items()))
        super().__init__(f"aliases point at it ({named}): move or remove them first")


class NoSuchVersion(Exception):
    """An alias was to point at a version that is not stored."""


def check_alias(alias: object) -> str:
    """An alias name, else ValueError (``latest`` is reserved)."""
    if not isinstance(alias, str) or not ALIAS_RE.fullmatch(alias):
        raise ValueError(
            f"alias {str(alias)[:40]!r} is invalid: use 1-32 characters of a-z, 0-9, '_', '-', "
            "starting with a letter"
        )
    if alias == LATEST:
        raise ValueError("alias 'latest' is reserved: it always means the highest version")
    return alias


def _stored(name: str, version: int, path: Path, st: os.stat_result) -> StoredVersion:
    file_id = (st.st_ino, st.st_mtime_ns, st.st_size)
    return StoredVersion(name, version, st.st_size, st.st_mtime, file_id, path)


class AdapterStore:
    """The directory store (the default); implements ``store_protocol.VersionStore``."""

    refresh_s = 0.0  # listings read the directory itself: never stale

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.location = str(self.root)
        self.tmp = self.root / ".tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps()

    def _remove_stale_temps(self) -> None:
        """Temp files left by writers killed mid-upload (fresh ones may be another
        replica's upload in progress)."""
        now = time.time()
        for entry in os.scandir(self.tmp):
            try:
                if now - entry.stat().st_mtime > STALE_TEMP_S:
                    os.unlink(entry.path)
            except FileNotFoundError:
                continue

    def names(self) -> list[str]:
        out = []
        for entry in os.scandir(self.root):
            if entry.is_dir() and not entry.name.startswith("."):
                try:
                    out.append(check_name(entry.name))
                except ValueError:
                    continue  # not ours: ignore
        return sorted(out)

    def versions(self, name: str) -> list[StoredVersion]:
        directory = self.root / check_name(name)
        found = []
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            return []
        for entry in entries:
            match = _VERSION_FILE.fullmatch(entry.name)
            if match and entry.is_file():
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue  # deleted between listing and stat: it is gone
                found.append(_stored(name, int(match[1]), Path(entry.path), st))
        return sorted(found, key=lambda v: v.version)

    def get(self, name: str, version: int | None = None) -> StoredVersion | None:
        versions = self.versions(name)
        if not versions:
            return None
        if version is None:
            return versions[-1]
        return next((v for v in versions if v.version == version), None)

    def put(self, name: str, encode: Callable[[int], bytes]) -> StoredVersion:
        """Store the next version of ``name``; ``encode(version)`` gives the file's bytes."""
        directory = self.root / check_name(name)
        created = not directory.exists()
        claim: Path | None = None
        final: Path | None = None
        try:
            claim = self._claim_version(directory)
            version = int(claim.name)
            data = encode(version)
            tmp = self.tmp / f"{uuid.uuid4().hex}.part"
            try:
                self._write_synced(tmp, data)
                final = directory / f"{version}{SUFFIX}"
                os.link(tmp, final)  # atomic; the claim makes the name ours alone
            finally:
                tmp.unlink(missing_ok=True)
            self._fsync_dir(directory)
            self._fsync_dir(claim.parent)  # the claim outlives a later delete of the file
            return _stored(name, version, final, final.stat())
        except BaseException as exc:
            if final is not None:
                # Linked but not durable: take it back. A reader may have seen it already,
                # so its number stays spent (the claim is kept).
                final.unlink(missing_ok=True)
            elif claim is not None:
                claim.unlink(missing_ok=True)  # nothing was stored under it: give it back
            if created:  # leave no empty directories (only when empty: others' versions stay)
                for empty in (directory / CLAIMED, directory):
                    try:
                        empty.rmdir()
                    except OSError:
                        pass
            if isinstance(exc, OSError):
                raise_if_full(exc)
            raise

    def put_exact(self, name: str, version: int, data: bytes) -> StoredVersion:
        """Store ``data`` as exactly ``name@version`` (a store being copied here)."""
        directory = self.root / check_name(name)
        claims = directory / CLAIMED
        claims.mkdir(parents=True, exist_ok=True)
        claim = claims / str(version)
        try:
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            raise VersionTaken(f"{name}@{version}") from None
        final = directory / f"{version}{SUFFIX}"
        tmp = self.tmp / f"{uuid.uuid4().hex}.part"
        linked = False
        try:
            self._write_synced(tmp, data)
            try:
                os.link(tmp, final)
            except FileExistsError:  # a version stored before claims existed
                raise VersionTaken(f"{name}@{version}") from None
            linked = True
            self._fsync_dir(directory)
            self._fsync_dir(claims)
        except OSError as exc:
            if linked:
                final.unlink(missing_ok=True)  # not durable: take it back, the number stays spent
            else:
                claim.unlink(missing_ok=True)
            raise_if_full(exc)
            raise
        finally:
            tmp.unlink(missing_ok=True)
        return _stored(name, version, final, final.stat())

    def read(self, stored: StoredVersion, max_bytes: int) -> bytes:
        path = stored.path or self.root / stored.name / f"{stored.version}{SUFFIX}"
        try:
            with path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > max_bytes:
                    raise AdapterTooLarge(f"adapter file is {size} bytes, the limit is {max_bytes}")
                return f.read(max_bytes + 1)  # bounded even if the file grew meanwhile
        except FileNotFoundError:
            raise VersionGone(stored.key) from None
        except OSError as e:
            raise AdapterFormatError(f"cannot read adapter file {str(path)!r}: {e.strerror or e}") from e

    def health(self) -> str | None:
        return None if self.root.is_dir() else f"the adapter directory {self.location} is gone"

    def delete(self, name: str, version: int | None = None) -> list[StoredVersion]:
        """Remove one version or all of ``name``; returns what was removed.

        Raises ``VersionAliased`` (deleting nothing) when an alias points at one of them.
        """
        directory = self.root / check_name(name)
        if not directory.is_dir():
            return []
        with self._locked(directory):
            doomed = self.versions(name)
            if version is not None:
                doomed = [v for v in doomed if v.version == version]
            gone = {v.version for v in doomed}
            held = {a: v for a, v in self.aliases(name).items() if v in gone}
            if held:
                raise VersionAliased(name, held)
            for stored in doomed:
                assert stored.path is not None  # listed by this store
                stored.path.unlink(missing_ok=True)
            if doomed:
                self._fsync_dir(directory)
        return doomed

    # ------------------------------------------------------------------ aliases

    def aliases(self, name: str) -> dict[str, int]:
        """Every alias of ``name`` and the version it points at."""
        directory = self.root / check_name(name) / ALIASES
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            return {}
        found = {}
        for entry in entries:
            if ALIAS_RE.fullmatch(entry.name) and (version := self._read_alias(Path(entry.path))):
                found[entry.name] = version
        return dict(sorted(found.items()))

    def alias(self, name: str, alias: str) -> int | None:
        """The version ``alias`` points at, or None when it is not set."""
        return self._read_alias(self.root / check_name(name) / ALIASES / check_alias(alias))

    def set_alias(self, name: str, alias: str, version: int) -> int | None:
        """Point ``alias`` at ``version`` (atomically); returns the version it pointed at
        before, if any. Raises ``NoSuchVersion`` when that version is not stored."""
        directory = self.root / check_name(name)
        path = directory / ALIASES / check_alias(alias)
        if not directory.is_dir():
            raise NoSuchVersion(f"{name}@{version}")
        with self._locked(directory):
            if self.get(name, version) is None:
                raise NoSuchVersion(f"{name}@{version}")
            previous = self._read_alias(path)
            path.parent.mkdir(exist_ok=True)
            tmp = self.tmp / f"{uuid.uuid4().hex}.alias"
            try:
                self._write_synced(tmp, f"{version}\n".encode())
                os.replace(tmp, path)  # atomic: readers see the old version or the new
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise_if_full(exc)
                raise
            self._fsync_dir(path.parent)
            return previous

    def delete_alias(self, name: str, alias: str) -> int | None:
        """Remove ``alias``; returns the version it pointed at, None if it was not set."""
        directory = self.root / check_name(name)
        path = directory / ALIASES / check_alias(alias)
        if not directory.is_dir():
            return None
        with self._locked(directory):
            previous = self._read_alias(path)
            if previous is not None:
                path.unlink(missing_ok=True)
                self._fsync_dir(path.parent)
            return previous

    @staticmethod
    def _read_alias(path: Path) -> int | None:
        try:
            text = path.read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return int(text) if _VERSION_FILE.fullmatch(f"{text}{SUFFIX}") else None

    @staticmethod
    @contextmanager
    def _locked(directory: Path) -> Iterator[None]:
        """One alias change or delete of a name at a time, across processes (flock)."""
        fd = os.open(directory / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _claim_version(self, directory: Path) -> Path:
        """The next version number of a name, claimed for this writer alone.

        Taken with O_EXCL, so two writers, here or on another replica, never share one. A
        claim outlives its file (a deleted version's number is never given again); only a
        write that stored nothing gives its claim back.
        """
        claims = directory / CLAIMED
        while True:
            claims.mkdir(parents=True, exist_ok=True)
            taken = [int(n) for n in os.listdir(claims) if n.isdigit()]
            stored = [v.version for v in self.versions(directory.name)]
            version = max([0, *taken, *stored]) + 1
            claim = claims / str(version)
            try:
                os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue  # another writer claimed it first: take the next
            except FileNotFoundError:
                continue  # a failed first upload removed the directory: make it again
            return claim

    @staticmethod
    def _write_synced(path: Path, data: bytes) -> None:
        try:
            with open(path, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            path.unlink(missing_ok=True)
            raise

    @staticmethod
    def _fsync_dir(directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
