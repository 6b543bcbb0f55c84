"""Two ``promptswap serve`` processes sharing one adapter store: an alias moved through one
is what the other resolves on its next request; a scoped key's rights are the same on both."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fixtures.adapters import adapter_bytes
from tests.conftest import encode, make_image
from tests.test_cli import free_port, serve, wait_ready

pytestmark = pytest.mark.slow  # two servers start

TOKEN = "replica-admin-7c1d"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TEAM_A, TEAM_B = "k-team-a-replicas-31", "k-team-b-replicas-42"


@pytest.fixture(scope="module")
def replicas(tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    root = tmp_path_factory.mktemp("replicas")
    (root / "keys.txt").write_text(f"{TEAM_A} use=team-a-* admin=team-a-*\n{TEAM_B} admin=team-b-*\n")
    procs: list[subprocess.Popen] = []
    urls = []
    try:
        for i in range(2):
            port = free_port()
            args = ["--clip-model", str(tiny_clip_dir), "--port", str(port), "--device", "cpu"]
            args += ["--adapter-dir", str(root / "store"), "--replica-id", f"r{i}", "--torch-threads", "1"]
            args += ["--api-keys-file", str(root / "keys.txt")]
            procs.append(serve(args, env={"PROMPTSWAP_ADMIN_TOKEN": TOKEN}))
            urls.append(f"http://127.0.0.1:{port}")
        for proc, url in zip(procs, urls, strict=True):
            wait_ready(proc, url)
        yield urls
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.communicate(timeout=60)


def classify(url: str, ref: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/classify",
        files={"image": ("i.png", encode(make_image(0)))},
        data={"labels": ["cat", "dog"], "adapter": ref},
        headers=headers or AUTH,  # the admin token has every right on the public routes too
        timeout=60,
    )


def test_an_alias_moved_on_one_replica_is_what_the_other_serves(replicas, tiny_clip_dir):
    one, two = replicas
    for seed in (1, 2):
        up = httpx.post(
            f"{one}/v1/admin/adapters",
            files={"file": ("a", adapter_bytes(tiny_clip_dir, "shared", seed=seed))},
            headers=AUTH,
        )
        assert up.status_code == 201, up.text
    # the second replica stores nothing for the same bytes: it reads what the first wrote
    again = httpx.post(
        f"{two}/v1/admin/adapters",
        files={"file": ("a", adapter_bytes(tiny_clip_dir, "shared", seed=1))},
        headers=AUTH,
    )
    assert again.status_code == 200 and again.json()["version"] == 1
    assert classify(two, "shared").json()["adapter"] == "shared@2"

    for via, version in ((one, 1), (two, 2), (one, 1)):
        moved = httpx.put(
            f"{via}/v1/admin/adapters/shared/aliases/default", json={"version": version}, headers=AUTH
        )
        assert moved.status_code == 200, moved.text
        for url in (one, two):
            answer = classify(url, "shared")
            assert answer.headers["x-promptswap-replica"] in ("r0", "r1")
            assert answer.json()["adapter"] == f"shared@{version}", (via, url)
            assert httpx.get(f"{url}/v1/adapters/shared", headers=AUTH).json()["aliases"] == {
                "default": version
            }

    refused = httpx.delete(f"{two}/v1/admin/adapters/shared@1", headers=AUTH)
    assert refused.status_code == 409
    assert httpx.delete(f"{one}/v1/admin/adapters/shared/aliases/default", headers=AUTH).status_code == 200
    assert classify(two, "shared").json()["adapter"] == "shared@2"
    assert httpx.delete(f"{two}/v1/admin/adapters/shared@1", headers=AUTH).status_code == 200
    assert classify(one, "shared@1").status_code == 404


def test_a_scoped_key_has_the_same_rights_on_every_replica(replicas, tiny_clip_dir):
    one, two = replicas
    a, b = {"X-API-Key": TEAM_A}, {"X-API-Key": TEAM_B}
    up = httpx.post(
        f"{one}/v1/admin/adapters",
        files={"file": ("a", adapter_bytes(tiny_clip_dir, "team-a-pets", seed=3))},
        headers=a,
    )
    assert up.status_code == 201, up.text
    aliased = httpx.put(f"{two}/v1/admin/adapters/team-a-pets/aliases/prod", json={"version": 1}, headers=a)
    assert aliased.status_code == 200, aliased.text
    for url in (one, two):
        assert classify(url, "team-a-pets@prod", a).json()["adapter"] == "team-a-pets@1"
        # team B cannot see it anywhere: absent to every route, refused as a foreign name
        assert classify(url, "team-a-pets@prod", b).status_code == 404
        assert "team-a" not in httpx.get(f"{url}/v1/adapters", headers=b).text
        moved = httpx.put(f"{url}/v1/admin/adapters/team-a-pets/aliases/prod", json={"version": 1}, headers=b)
        assert moved.status_code == 404
        refused = httpx.post(
            f"{url}/v1/admin/adapters",
            files={"file": ("a", adapter_bytes(tiny_clip_dir, "team-a-pets", seed=4))},
            headers=b,
        )
        assert refused.status_code == 403 and "team-a-pets" in refused.json()["error"]["message"]
    assert httpx.delete(f"{one}/v1/admin/adapters/team-a-pets@1", headers=a).status_code == 409  # aliased
