"""Fixtures of the store tests: one SeaweedFS per session, a fresh bucket per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.seaweedfs import S3Server, seaweedfs


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_url(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh s3://BUCKET/PREFIX, with the AWS variables of the server set."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server.new_url()
