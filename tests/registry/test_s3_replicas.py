"""Two ``promptswap serve`` processes sharing one bucket on a real S3 server (SeaweedFS):
an upload through one is served by the other within the refresh bound, concurrent
uploads through both get distinct versions, and refused credentials stop the start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from fixtures.adapters import adapter_bytes
from fixtures.images import encode, make_image
from tests.seaweedfs import S3Server, free_ports

TOKEN = "replica-token"
REFRESH_S = 1.0
# The bound under test is REFRESH_S; the margin covers one listing, one download and a
# classify on a loaded 2-core machine. Staleness itself is tested exactly with a clock in
# test_s3_store.py; this checks that real processes honour it.
MARGIN_S = 10.0


def serve(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "service", "serve", *args],
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_ready(proc: subprocess.Popen, url: str, limit_s: float = 120) -> None:
    give_up = time.monotonic() + limit_s
    while time.monotonic() < give_up:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early:\n{proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).json().get("status") == "ready":
                return
        except (httpx.TransportError, ValueError):
            pass
        time.sleep(0.2)  # polling a child process's readiness, not a timing assertion
    raise AssertionError("server did not become ready")


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        output, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
    return output


@pytest.fixture
def replicas(s3_server: S3Server, tiny_clip_dir: Path) -> Iterator[tuple[str, str]]:
    url = s3_server.new_url()
    ports = free_ports(2)
    env = s3_server.env(PROMPTSWAP_ADMIN_TOKEN=TOKEN)
    procs = [
        serve(
            [
                *("--clip-model", str(tiny_clip_dir), "--device", "cpu", "--port", str(port)),
                *("--adapter-store", url, "--store-refresh-s", str(REFRESH_S), "--replica-id", f"r{i}"),
            ],
            env,
        )
        for i, port in enumerate(ports)
    ]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        for proc, base in zip(procs, urls, strict=True):
            wait_ready(proc, base)
        yield urls[0], urls[1]
    finally:
        for proc in procs:
            stop(proc)


def upload(base: str, data: bytes) -> httpx.Response:
    return httpx.post(
        f"{base}/v1/admin/adapters",
        files={"file": ("a.safetensors", data)},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=60,
    )


def classify(base: str, adapter: str) -> httpx.Response:
    image = encode(make_image(1))
    data = {"labels": ["cat", "dog"], "adapter": adapter}
    return httpx.post(f"{base}/v1/classify", files={"image": ("i.png", image)}, data=data, timeout=60)


@pytest.mark.slow
def test_an_upload_through_one_replica_is_served_by_the_other_within_the_bound(replicas, tiny_clip_dir):
    a, b = replicas
    assert classify(b, "pets").status_code == 404  # b has listed the bucket: no pets
    created = upload(a, adapter_bytes(tiny_clip_dir, "pets", seed=5))
    assert created.status_code == 201, created.text
    uploaded = time.monotonic()
    assert classify(a, "pets").status_code == 200  # its own write: at once
    while (answer := classify(b, "pets")).status_code == 404:
        assert time.monotonic() - uploaded < REFRESH_S + MARGIN_S, "b never saw the upload"
        time.sleep(0.1)  # polling another process, not a timing assertion
    assert answer.status_code == 200 and answer.json()["adapter"] == "pets@1"
    assert answer.headers["X-Promptswap-Replica"] == "r1"
    assert answer.json()["labels"] == classify(a, "pets").json()["labels"]  # the same bytes


@pytest.mark.slow
def test_concurrent_uploads_through_both_replicas_get_distinct_versions(replicas, tiny_clip_dir):
    a, b = replicas
    data = [adapter_bytes(tiny_clip_dir, "race", seed=i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: upload((a, b)[i % 2], data[i]), range(8)))
    assert [r.status_code for r in answers] == [201] * 8, [r.text for r in answers]
    assert sorted(r.json()["version"] for r in answers) == list(range(1, 9))
    deadline = time.monotonic() + REFRESH_S + MARGIN_S
    # b sees its own uploads at once and a's within the bound: wait for all 8, not for latest 8
    while len((listed := httpx.get(f"{b}/v1/adapters/race", timeout=30).json())["versions"]) < 8:
        assert time.monotonic() < deadline, listed
        time.sleep(0.1)  # polling another process, not a timing assertion
    assert [v["key"] for v in listed["versions"]] == [f"race@{v}" for v in range(1, 9)]
    # Each version serves its own upload: the adapter uid carries the tensors' sha256.
    shas = {r.json()["key"]: r.json()["manifest"]["tensors_sha256"] for r in answers}
    assert len(set(shas.values())) == 8


@pytest.mark.slow
def test_refused_credentials_stop_promptswap_serve_with_a_clear_message(s3_server: S3Server, tiny_clip_dir):
    env = s3_server.env(AWS_SECRET_ACCESS_KEY="wrong-secret")
    port = free_ports(1)[0]
    args = ["--clip-model", str(tiny_clip_dir), "--device", "cpu", "--port", str(port)]
    proc = serve([*args, "--adapter-store", s3_server.new_url()], env)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, output
    assert "start-up failed" in output and "refused the credentials" in output
    assert "wrong-secret" not in output
