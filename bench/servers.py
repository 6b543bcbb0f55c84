"""Start a server as a subprocess on a free loopback port, wait until ready, stop it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from .models import OUT

REPO = Path(__file__).resolve().parent.parent
LOG_DIR = OUT / "logs"
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    argv: list[str]  # as run, for RESULTS.md
    env: dict[str, str]  # extra environment, for RESULTS.md (secrets masked by caller)
    port: int
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def stop(self, timeout_s: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # uvicorn drains and runs the lifespan's shutdown
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(
    name: str,
    argv: list[str],
    env: dict[str, str],
    port: int,
    ready_path: str = "/readyz",
    timeout_s: float = 180,
) -> Server:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = open(LOG_DIR / f"{name}.log", "wb")
    full_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    proc = subprocess.Popen(
        [sys.executable, *argv], cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT
    )
    server = Server(name, argv, env, port, proc)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}; see {LOG_DIR / (name + '.log')}")
        try:
            if httpx.get(server.url + ready_path, timeout=2, trust_env=False).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"{name} not ready within {timeout_s} s")


def service_argv(model: Path, port: int, adapter_dir: Path, **options: object) -> list[str]:
    """``promptswap serve`` on the CPU; the caller sets the dtype (PROMPTSWAP_DTYPE)."""
    argv = [
        "-m",
        "service",
        "serve",
        "--clip-model",
        str(model),
        "--device",
        "cpu",
        "--port",
        str(port),
        "--adapter-dir",
        str(adapter_dir),
        "--log-level",
        "warning",
    ]
    for key, value in options.items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    return argv


def naive_argv(port: int) -> list[str]:
    return [
        "-m",
        "uvicorn",
        "bench.naive_app:app",
        "--host",
        HOST,
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
