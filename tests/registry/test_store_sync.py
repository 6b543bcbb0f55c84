"""``promptswap adapters sync``: directory -> bucket -> directory, version numbers kept."""

from __future__ import annotations

from pathlib import Path

from fixtures.adapters import adapter_bytes
from service.cli import main
from service.registry.s3_store import S3Store
from service.registry.store import AdapterStore


def test_sync_copies_a_store_both_ways_keeping_versions(s3_url: str, tmp_path: Path, tiny_clip_dir, capsys):
    source = AdapterStore(tmp_path / "source")
    for seed in range(3):
        source.put("pets", lambda v, seed=seed: adapter_bytes(tiny_clip_dir, "pets", seed=seed))
    source.put("cars", lambda v: adapter_bytes(tiny_clip_dir, "cars", seed=9))
    source.delete("pets", 2)  # a gap the copy must keep: pets@3 stays pets@3

    assert main(["adapters", "sync", str(tmp_path / "source"), s3_url]) == 0
    assert "3 copied, 0 already there, 0 conflicts" in capsys.readouterr().out
    bucket = S3Store(s3_url)
    assert [v.key for v in bucket.versions("pets")] == ["pets@1", "pets@3"]
    for stored in source.versions("pets"):
        assert bucket.read(bucket.get("pets", stored.version), 10**6) == stored.path.read_bytes()

    assert main(["adapters", "sync", str(tmp_path / "source"), s3_url]) == 0  # again: nothing new
    assert "0 copied, 3 already there" in capsys.readouterr().out

    assert main(["adapters", "sync", s3_url, str(tmp_path / "back")]) == 0
    back = AdapterStore(tmp_path / "back")
    assert [v.key for v in back.versions("pets")] == ["pets@1", "pets@3"]
    assert back.get("cars", 1).path.read_bytes() == source.get("cars", 1).path.read_bytes()


def test_sync_never_overwrites_other_content_and_says_so(s3_url: str, tmp_path: Path, tiny_clip_dir, capsys):
    AdapterStore(tmp_path / "a").put("pets", lambda v: adapter_bytes(tiny_clip_dir, "pets", seed=1))
    S3Store(s3_url).put("pets", lambda v: adapter_bytes(tiny_clip_dir, "pets", seed=2))
    before = S3Store(s3_url).read(S3Store(s3_url).get("pets", 1), 10**6)
    assert main(["adapters", "sync", str(tmp_path / "a"), s3_url]) == 1
    assert "conflict pets@1" in capsys.readouterr().out
    assert S3Store(s3_url).read(S3Store(s3_url).get("pets", 1), 10**6) == before


def test_sync_reports_an_unreachable_bucket_without_a_traceback(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    assert main(["adapters", "sync", str(tmp_path), "s3://nowhere/adapters"]) == 1
    assert "did not answer" in capsys.readouterr().err
