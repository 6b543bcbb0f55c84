"""The adapter store: versioned adapter files in one directory, written atomically.

Layout: ``<root>/<name>/<version>.safetensors`` (version 1, 2, ...). A write goes to
``<root>/.tmp/``, is fsynced, then hard-linked to its final name, which fails if that
name exists: two writers (two replicas on one shared volume) can never overwrite each
other's version, and no reader ever sees a half-written file. A failed write leaves the
store as it was. Version numbers are never reused, even after deletes: ``<name>/.latest``
keeps the highest version ever written, so ``name@3`` always means one content. Names are checked against ``[a-z0-9][a-z0-9._-]{0,63}`` before any
path is built, so no name can leave the root.
"""

from __future__ import annotations

import errno
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adapters.format import check_name

SUFFIX = ".safetensors"
HIGH_WATER = ".latest"
_VERSION_FILE = re.compile(r"([1-9][0-9]{0,8})\.safetensors")


class StoreFull(OSError):
    """The disk refused the write (ENOSPC / EDQUOT); the store is unchanged."""


@dataclass(frozen=True)
class StoredVersion:
    name: str
    version: int
    path: Path
    size: int
    mtime: float
    file_id: tuple[int, int, int] = (0, 0, 0)  # inode, mtime ns, size: which file, not which name

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"


def _stored(name: str, version: int, path: Path, st: os.stat_result) -> StoredVersion:
    return StoredVersion(
        name, version, path, st.st_size, st.st_mtime, (st.st_ino, st.st_mtime_ns, st.st_size)
    )


class AdapterStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp = self.root / ".tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

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
        try:
            while True:
                current = self.versions(name)
                highest = max([v.version for v in current] + [self._high_water(directory)])
                version = highest + 1
                data = encode(version)
                tmp = self.tmp / f"{uuid.uuid4().hex}.part"
                try:
                    self._write_synced(tmp, data)
                    final = directory / f"{version}{SUFFIX}"
                    directory.mkdir(exist_ok=True)
                    try:
                        os.link(tmp, final)  # atomic, never overwrites
                    except FileExistsError:
                        continue  # another writer took this version: take the next
                    except FileNotFoundError:
                        continue  # a failed writer removed the empty directory: make it again
                    self._set_high_water(directory, version)
                    self._fsync_dir(directory)
                    return _stored(name, version, final, final.stat())
                finally:
                    tmp.unlink(missing_ok=True)
        except BaseException:
            if created:  # a failed first upload leaves no empty name directory behind
                try:
                    directory.rmdir()  # only when empty: another writer's version stays
                except OSError:
                    pass
            raise

    def delete(self, name: str, version: int | None = None) -> list[StoredVersion]:
        """Remove one version or all of ``name``; returns what was removed."""
        doomed = self.versions(name)
        if version is not None:
            doomed = [v for v in doomed if v.version == version]
        for stored in doomed:
            stored.path.unlink(missing_ok=True)
        directory = self.root / check_name(name)
        if doomed:
            self._fsync_dir(directory)
            try:
                directory.rmdir()  # only when empty
            except OSError:
                pass
        return doomed

    @staticmethod
    def _high_water(directory: Path) -> int:
        try:
            return int((directory / HIGH_WATER).read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _set_high_water(self, directory: Path, version: int) -> None:
        if version <= self._high_water(directory):
            return
        tmp = self.tmp / f"{uuid.uuid4().hex}.latest"
        tmp.write_text(str(version))
        os.replace(tmp, directory / HIGH_WATER)  # atomic: readers see the old or the new number

    @staticmethod
    def _write_synced(path: Path, data: bytes) -> None:
        try:
            with open(path, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            path.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(exc.errno, "no space left for the adapter store") from exc
            raise

    @staticmethod
    def _fsync_dir(directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
