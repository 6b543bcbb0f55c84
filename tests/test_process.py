"""A real ``python -m service serve`` process: it classifies, stops cleanly and fails clearly
at start-up; secrets never reach its output; SIGTERM lets in-flight requests finish,
refuses new connections, and exits cleanly."""

from __future__ import annotations

import base64
import json
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from fixtures.adapters import adapter_bytes
from tests.conftest import encode, make_image
from tests.test_cli import free_port, serve, wait_ready

TOKEN = "admin-secret-5f3a9c"
KEYS = ("public-key-1b7e44", "public-key-2c8f55")


def open_request(port: int, body: bytes, key: str) -> tuple[socket.socket, bytes]:
    """Send a request's headers with ``Expect: 100-continue`` and wait for the server's
    ``100 Continue``: the app is then running it and waiting for the body."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = (
        "POST /v1/classify HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nX-API-Key: {key}\r\nExpect: 100-continue\r\n\r\n"
    )
    sock.sendall(head.encode())
    seen = b""
    while b"\r\n\r\n" not in seen:
        chunk = sock.recv(4096)
        assert chunk, "the server closed the connection before 100 Continue"
        seen += chunk
    assert seen.startswith(b"HTTP/1.1 100"), seen
    return sock, body


def finish_request(sock: socket.socket, body: bytes) -> tuple[int, bytes]:
    sock.sendall(body)
    answer = b""
    while chunk := sock.recv(65536):  # the server closes the connection after answering
        answer += chunk
    sock.close()
    status = int(answer.split(b" ", 2)[1])
    return status, answer.partition(b"\r\n\r\n")[2]


def wait_refused(port: int, limit_s: float = 60) -> None:
    give_up = time.monotonic() + limit_s
    while time.monotonic() < give_up:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except ConnectionRefusedError:
            return
        time.sleep(0.05)  # polling the child's state, not a timing assertion
    raise AssertionError("the server still accepts connections after SIGTERM")


@pytest.mark.slow  # a real process: 9-17 s
def test_real_server_keeps_its_secrets_and_drains_on_sigterm(tiny_clip_dir: Path, tmp_path: Path):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"# keys\n{KEYS[0]}\n{KEYS[1]}\n")
    port = free_port()
    proc = serve(
        [
            "--clip-model",
            str(tiny_clip_dir),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--log-level",
            "debug",
            "--api-keys-file",
            str(keys_file),
            "--adapter-dir",
            str(tmp_path / "store"),
        ],
        env={"PROMPTSWAP_ADMIN_TOKEN": TOKEN},
    )
    url = f"http://127.0.0.1:{port}"
    in_flight: list[tuple[socket.socket, bytes]] = []
    try:
        wait_ready(proc, url)
        image = encode(make_image(0))
        files = {"image": ("i.png", image)}

        # Secrets: refused and accepted calls on both kinds of credential.
        adapter = {"file": ("a.safetensors", adapter_bytes(tiny_clip_dir, "pets"))}
        # A wrong credential is 401; a valid API key without admin scope is 403 (scoped keys).
        for wrong, status in (("wrong", 401), (TOKEN + "x", 401), (KEYS[0], 403)):
            r = httpx.post(
                f"{url}/v1/admin/adapters", files=adapter, headers={"Authorization": f"Bearer {wrong}"}
            )
            assert r.status_code == status and TOKEN not in r.text, (wrong, r.text)
        admin = {"Authorization": f"Bearer {TOKEN}"}
        assert httpx.post(f"{url}/v1/admin/adapters", files=adapter, headers=admin).status_code == 201
        assert (
            httpx.post(f"{url}/v1/admin/adapters", files={"file": ("x", b"junk")}, headers=admin).status_code
            == 400
        )
        for headers in ({}, {"X-API-Key": TOKEN + "x"}, {"Authorization": f"Bearer {KEYS[0]}x"}):
            r = httpx.post(f"{url}/v1/classify", files=files, data={"labels": ["cat"]}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        # The admin token keeps every right, the public routes' included (scoped keys).
        r = httpx.post(
            f"{url}/v1/classify", files=files, data={"labels": ["cat"]}, headers={"X-API-Key": TOKEN}
        )
        assert r.status_code == 200, r.text
        r = httpx.post(
            f"{url}/v1/classify",
            files=files,
            data={"labels": ["cat", "dog"], "adapter": "pets"},
            headers={"X-API-Key": KEYS[1]},
        )
        assert r.status_code == 200, r.text
        assert httpx.get(f"{url}/metrics").status_code == 200  # open without a key

        # SIGTERM with three requests in flight (the app is waiting for their bodies).
        body = json.dumps({"image": base64.b64encode(image).decode(), "labels": ["cat", "dog"]}).encode()
        in_flight = [open_request(port, body, KEYS[i % 2]) for i in range(3)]
        proc.send_signal(signal.SIGTERM)
        wait_refused(port)  # new connections are refused while those are still open
        assert proc.poll() is None
        for sock, rest in in_flight:
            status, answer = finish_request(sock, rest)
            assert status == 200, answer
            assert json.loads(answer)["labels"][0]["label"] in {"cat", "dog"}
        in_flight = []
        output, _ = proc.communicate(timeout=60)
    finally:
        for sock, _ in in_flight:
            sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # uvicorn re-raises the SIGTERM after a graceful shutdown, so the status may say so.
    assert proc.returncode in (0, -signal.SIGTERM), output
    # It waited for the three: they were answered 200 after SIGTERM, while new connections
    # were refused and the process was still alive (uvicorn's own log line about waiting
    # depends on its timing, so it is not asserted).
    assert "Application shutdown complete" in output
    assert "401" in output and "DEBUG" in output  # the log saw the refusals, at full detail
    assert TOKEN not in output
    assert all(key not in output for key in KEYS)


@pytest.mark.slow  # a real process: 9-17 s
def test_real_server_classifies_and_stops_cleanly(tiny_clip_dir: Path):
    port = free_port()
    proc = serve(
        ["--clip-model", str(tiny_clip_dir), "--port", str(port), "--device", "cpu"],
        env={"PROMPTSWAP_MAX_LABELS": "2"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url)
        image = encode(make_image(0))
        ok = httpx.post(
            f"{url}/v1/classify", files={"image": ("i.png", image)}, data={"labels": ["cat", "dog"]}
        )
        assert ok.status_code == 200 and ok.json()["labels"][0]["label"] in {"cat", "dog"}
        too_many = httpx.post(
            f"{url}/v1/classify", files={"image": ("i.png", image)}, data={"labels": ["a", "b", "c"]}
        )
        assert too_many.status_code == 422  # PROMPTSWAP_MAX_LABELS reached the server
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    # uvicorn re-raises the SIGTERM after a graceful shutdown, so the status says so.
    assert proc.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output


@pytest.mark.slow  # a real process: 9-17 s
def test_not_a_clip_checkpoint_fails_at_start_up(tmp_path: Path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    proc = serve(["--clip-model", str(tmp_path), "--port", str(free_port()), "--device", "cpu"])
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "not a CLIP checkpoint" in output
