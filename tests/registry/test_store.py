"""The adapter store on its own: version numbers under concurrent writers (threads here,
replicas on a shared volume), claims, temp-file cleanup, aliases."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.registry.store import (
    CLAIMED,
    STALE_TEMP_S,
    AdapterStore,
    NoSuchVersion,
    VersionAliased,
    check_alias,
)


def put(store: AdapterStore, name: str = "pets") -> int:
    return store.put(name, lambda version: f"content of v{version}".encode()).version


def test_concurrent_writers_on_one_volume_never_share_or_reuse_a_number(tmp_path):
    replicas = [AdapterStore(tmp_path) for _ in range(2)]  # two processes' views of one root
    with ThreadPoolExecutor(8) as pool:
        numbers = list(pool.map(lambda i: put(replicas[i % 2]), range(40)))
    assert sorted(numbers) == list(range(1, 41))
    for stored in replicas[0].versions("pets"):  # each file holds the number it was given
        assert stored.path.read_bytes() == f"content of v{stored.version}".encode()
    replicas[1].delete("pets", 40)
    assert put(replicas[0]) == 41  # the deleted latest's number stays spent


def test_a_number_claimed_by_a_writer_still_writing_is_skipped(tmp_path):
    store = AdapterStore(tmp_path)
    assert put(store) == 1
    (tmp_path / "pets" / CLAIMED / "2").touch()  # another replica is writing version 2
    assert put(store) == 3
    store.delete("pets")
    assert put(store) == 4


def test_a_failed_write_gives_its_number_back_and_leaves_nothing(tmp_path):
    store = AdapterStore(tmp_path)

    def fail(version: int) -> bytes:
        raise RuntimeError("encoder failed")

    try:
        store.put("fresh", fail)
    except RuntimeError:
        pass
    assert not (tmp_path / "fresh").exists()
    assert put(store, "fresh") == 1  # nothing was ever stored as fresh@1


def test_temp_files_of_dead_writers_are_removed_but_fresh_ones_kept(tmp_path):
    store = AdapterStore(tmp_path)
    dead, alive = store.tmp / "dead.part", store.tmp / "alive.part"
    dead.write_bytes(b"half")
    alive.write_bytes(b"half")
    old = time.time() - STALE_TEMP_S - 60
    os.utime(dead, (old, old))
    AdapterStore(tmp_path)  # a replica starting
    assert not dead.exists() and alive.exists()


def test_a_directory_fsync_failing_after_the_link_takes_the_file_back(tmp_path, monkeypatch):
    import errno

    import pytest

    from service.registry.store import StoreFull

    store = AdapterStore(tmp_path)
    assert put(store) == 1

    def full(directory) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(AdapterStore, "_fsync_dir", staticmethod(full))
        with pytest.raises(StoreFull):
            put(store)
    assert [v.version for v in store.versions("pets")] == [1]  # not half-stored
    assert put(store) == 3  # 2 may have been seen by a reader: it stays spent


def test_aliases_are_shared_atomic_and_guard_their_versions(tmp_path):
    one, two = AdapterStore(tmp_path), AdapterStore(tmp_path)  # two replicas' views
    put(one), put(one)
    assert one.set_alias("pets", "prod", 1) is None
    assert two.alias("pets", "prod") == 1 and two.aliases("pets") == {"prod": 1}
    assert two.set_alias("pets", "prod", 2) == 1  # moved: the old target is returned
    assert one.alias("pets", "prod") == 2
    with pytest.raises(NoSuchVersion):
        one.set_alias("pets", "prod", 9)
    assert one.alias("pets", "prod") == 2  # a refused move changes nothing
    with pytest.raises(VersionAliased, match="prod -> pets@2"):
        two.delete("pets", 2)
    with pytest.raises(VersionAliased):
        two.delete("pets")  # every version, so the aliased one too
    assert [v.version for v in one.versions("pets")] == [1, 2]
    assert [v.version for v in two.delete("pets", 1)] == [1]  # not aliased: deleted
    assert one.delete_alias("pets", "prod") == 2 and two.delete_alias("pets", "prod") is None
    assert [v.version for v in one.delete("pets")] == [2]
    assert os.listdir(tmp_path / ".tmp") == []  # no temp file left behind
    for bad in ("latest", "Prod", "9lives", "", "a/b"):
        with pytest.raises(ValueError):
            check_alias(bad)
