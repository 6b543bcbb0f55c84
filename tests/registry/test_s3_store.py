"""The bucket store against a real S3 server (SeaweedFS): the directory store's promises,
the conditional write they rest on, the bounded-staleness view and the byte cache."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from botocore.exceptions import ClientError

from adapters.errors import AdapterChecksumError, AdapterTooLarge
from service.registry.s3_store import S3Store, parse_s3_url
from service.registry.store import NoSuchVersion, VersionAliased
from service.registry.store_protocol import VersionGone, VersionTaken
from tests.seaweedfs import S3Server


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def put(store: S3Store, name: str = "pets") -> int:
    return store.put(name, lambda version: f"content of v{version}".encode()).version


def count_calls(store: S3Store, operation: str) -> list[str]:
    calls: list[str] = []
    store.client.meta.events.register(f"before-call.s3.{operation}", lambda **_: calls.append(operation))
    return calls


def test_the_server_refuses_a_second_create_of_one_key_even_under_a_race(s3_server: S3Server):
    """What the version numbers rest on: If-None-Match: * is enforced, atomically."""
    client, (bucket, prefix) = s3_server.client(max_pool_connections=16), parse_s3_url(s3_server.new_url())
    for trial in range(3):
        key, start = f"{prefix}race/{trial}", threading.Barrier(12)

        def create(i: int, key: str = key, start: threading.Barrier = start) -> int | None:
            start.wait()
            try:
                client.put_object(Bucket=bucket, Key=key, Body=f"w{i}".encode(), IfNoneMatch="*")
                return i
            except ClientError as exc:
                assert exc.response["Error"]["Code"] == "PreconditionFailed"
                return None

        with ThreadPoolExecutor(12) as pool:
            winners = [i for i in pool.map(create, range(12)) if i is not None]
        assert len(winners) == 1
        assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == f"w{winners[0]}".encode()


def test_two_replicas_writing_at_once_never_share_or_reuse_a_number(s3_url: str):
    replicas = [S3Store(s3_url) for _ in range(2)]  # two processes' views of one bucket
    with ThreadPoolExecutor(8) as pool:
        numbers = list(pool.map(lambda i: put(replicas[i % 2]), range(24)))
    assert sorted(numbers) == list(range(1, 25))
    for stored in S3Store(s3_url).versions("pets"):  # each object holds the number it was given
        assert replicas[0].read(stored, 1000) == f"content of v{stored.version}".encode()
    assert [v.key for v in replicas[1].delete("pets", 24)] == ["pets@24"]
    assert put(replicas[0]) == 25  # the deleted latest's number stays spent
    replicas[0].delete("pets")
    assert replicas[0].get("pets") is None and replicas[0].names() == []
    assert put(replicas[1]) == 26  # and so do all of a deleted name's


def test_a_failed_write_gives_its_number_back_and_stores_nothing(s3_url: str, s3_server: S3Server):
    store = S3Store(s3_url)

    def fail(version: int) -> bytes:
        raise RuntimeError("encoder failed")

    with pytest.raises(RuntimeError):
        store.put("fresh", fail)
    bucket, prefix = parse_s3_url(s3_url)
    assert s3_server.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents") is None
    assert put(store, "fresh") == 1  # nothing was ever stored as fresh@1


def test_a_version_written_without_a_claim_is_never_overwritten(s3_url: str, s3_server: S3Server):
    bucket, prefix = parse_s3_url(s3_url)
    s3_server.client().put_object(Bucket=bucket, Key=f"{prefix}pets/1.safetensors", Body=b"foreign")
    store = S3Store(s3_url)
    assert put(store) == 2  # the foreign object's number is skipped, its bytes kept
    assert store.read(store.get("pets", 1), 100) == b"foreign"
    with pytest.raises(VersionTaken):
        store.put_exact("pets", 1, b"mine")
    with pytest.raises(VersionTaken):
        store.put_exact("pets", 2, b"mine")
    assert store.put_exact("pets", 7, b"copied").version == 7
    assert put(store) == 8


def test_every_read_checks_the_sha256_recorded_at_upload(s3_url: str, s3_server: S3Server):
    store = S3Store(s3_url, cache_bytes=0)
    stored = store.put("pets", lambda v: b"the real bytes")
    bucket, _ = parse_s3_url(s3_url)
    key = f"{store.prefix}pets/1.safetensors"
    client = s3_server.client()
    recorded = client.head_object(Bucket=bucket, Key=key)["Metadata"]
    client.put_object(Bucket=bucket, Key=key, Body=b"the fake bytes", Metadata=recorded)  # bit rot
    with pytest.raises(AdapterChecksumError):
        store.read(stored, 100)
    with pytest.raises(AdapterTooLarge):
        store.read(stored, 5)


def test_the_byte_cache_saves_downloads_and_never_serves_changed_bytes(s3_url: str):
    store = S3Store(s3_url)
    stored = store.put("pets", lambda v: b"x" * 1000)
    gets = count_calls(store, "GetObject")
    assert store.read(stored, 2000) == b"x" * 1000  # written here: cached already
    assert gets == []
    entry, digest = store.cache._entries[(stored.key, stored.file_id)]
    store.cache._entries[(stored.key, stored.file_id)] = (b"y" * 1000, digest)  # changed in memory
    assert store.read(stored, 2000) == b"x" * 1000
    assert gets == ["GetObject"]
    assert store.read(stored, 2000) == b"x" * 1000  # cached again after the verified download
    assert gets == ["GetObject"]


def test_the_byte_cache_is_bounded():
    from service.registry.byte_cache import ByteCache

    cache = ByteCache(250)
    for i in range(3):
        cache.put(i, bytes(100), "0" * 64)
    assert cache.nbytes == 200 and list(cache._entries) == [1, 2]


def test_other_replicas_writes_are_seen_within_the_refresh_bound_own_writes_at_once(s3_url: str):
    clock = Clock()
    here, there = S3Store(s3_url, refresh_s=2.0, clock=clock), S3Store(s3_url, refresh_s=2.0, clock=clock)
    assert here.get("pets") is None and there.get("pets") is None  # both views listed
    lists = count_calls(there, "ListObjectsV2")
    put(here)
    assert here.get("pets").version == 1  # its own write: at once
    clock.now += 1.9
    assert there.get("pets") is None  # within the bound, the view is reused: no round trip
    assert lists == []
    clock.now += 0.2
    assert there.get("pets").version == 1  # past it: listed again
    assert lists == ["ListObjectsV2"]
    here.delete("pets")
    assert here.get("pets") is None
    clock.now += 2.1
    assert there.get("pets") is None and there.names() == []


def test_a_version_deleted_after_listing_is_gone_on_read(s3_url: str):
    clock = Clock()
    here, there = S3Store(s3_url, clock=clock, cache_bytes=0), S3Store(s3_url, clock=clock, cache_bytes=0)
    put(here)
    clock.now += 10
    stored = there.get("pets")
    here.delete("pets", 1)
    with pytest.raises(VersionGone):
        there.read(stored, 100)
    assert there.get("pets") is None  # the view forgot it at once


def test_aliases_set_move_delete_one_object_each_seen_by_other_replicas_within_the_bound(
    s3_url: str, s3_server: S3Server
):
    clock = Clock()
    here, there = S3Store(s3_url, clock=clock), S3Store(s3_url, clock=clock)
    put(here), put(here)
    assert there.aliases("pets") == {} and there.alias("pets", "default") is None  # listed
    assert here.set_alias("pets", "default", 1) is None
    assert here.set_alias("pets", "prod", 2) is None
    assert here.alias("pets", "default") == 1  # its own write: at once
    bucket, prefix = parse_s3_url(s3_url)
    body = s3_server.client().get_object(Bucket=bucket, Key=f"{prefix}pets/.aliases/default")["Body"]
    assert body.read() == b"1\n"  # the directory store's layout and content
    assert there.alias("pets", "default") is None  # within the bound: the old view
    clock.now += 2.1
    assert there.aliases("pets") == {"default": 1, "prod": 2}
    reads = count_calls(there, "GetObject")
    assert here.set_alias("pets", "default", 2) == 1  # moved: returns the previous version
    clock.now += 2.1
    assert there.aliases("pets") == {"default": 2, "prod": 2}
    assert reads == ["GetObject"]  # only the changed alias object was read again
    assert there.delete_alias("pets", "prod") == 2
    assert there.alias("pets", "prod") is None  # its own delete: at once
    assert there.delete_alias("pets", "prod") is None
    clock.now += 2.1
    assert here.aliases("pets") == {"default": 2}
    with pytest.raises(NoSuchVersion):
        here.set_alias("pets", "default", 7)
    with pytest.raises(NoSuchVersion):
        here.set_alias("nobody", "default", 1)
    with pytest.raises(ValueError):
        here.set_alias("pets", "latest", 1)
    assert here.alias("pets", "default") == 2  # nothing changed by the refusals


def test_delete_of_an_aliased_version_is_refused_on_a_fresh_read_of_the_aliases(s3_url: str):
    clock = Clock()
    here, there = S3Store(s3_url, clock=clock), S3Store(s3_url, clock=clock)
    put(here), put(here)
    assert there.aliases("pets") == {}  # there's view: no aliases, and it stays fresh below
    here.set_alias("pets", "default", 1)
    with pytest.raises(VersionAliased, match="default -> pets@1"):
        there.delete("pets", 1)  # its view is stale, the delete reads the bucket
    with pytest.raises(VersionAliased):
        there.delete("pets")
    assert [v.version for v in here.versions("pets")] == [1, 2]  # nothing was deleted
    assert [v.version for v in there.delete("pets", 2)] == [2]
    assert here.delete_alias("pets", "default") == 1
    assert [v.version for v in there.delete("pets")] == [1]
