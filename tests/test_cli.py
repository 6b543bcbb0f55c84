"""The ``promptswap`` command as a user runs it: options and environment; how tests start a
real server (the real process itself: tests/test_process.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from service.cli import build_parser
from service.settings import Settings

SERVE_OPTIONS = [
    "--clip-model",
    "--host",
    "--port",
    "--device",
    "--dtype",
    "--max-batch-size",
    "--max-wait-ms",
    "--max-queue",
]


def test_help_documents_every_option_with_default_and_env(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no line breaks inside values
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in SERVE_OPTIONS:
        assert option in text
    for name in Settings.model_fields:
        assert f"PROMPTSWAP_{name.upper()}" in text
    assert "Default: openai/clip-vit-base-patch16" in text


def test_cli_overrides_environment(monkeypatch):
    from service import cli

    captured = {}
    monkeypatch.setattr(cli, "serve", lambda overrides: captured.update(overrides) or 0)
    monkeypatch.setenv("PROMPTSWAP_MAX_QUEUE", "7")
    assert cli.main(["serve", "--max-batch-size", "3", "--device", "cpu"]) == 0
    settings = Settings(**captured)
    assert (settings.max_batch_size, settings.device, settings.max_queue) == (3, "cpu", 7)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "service", "serve", *args],
        # a store of its own: a test never writes to the user's data directory
        env={
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "PROMPTSWAP_ADAPTER_DIR": tempfile.mkdtemp(),
            **(env or {}),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_ready(proc: subprocess.Popen, url: str, limit_s: float = 120) -> None:
    give_up = time.monotonic() + limit_s
    while time.monotonic() < give_up:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)  # polling a child process's readiness, not a timing assertion
    raise AssertionError("server did not become ready")


def test_adapters_subcommands_run_through_promptswap(tmp_path: Path, tiny_clip_dir: Path, capsys):
    from fixtures.adapters import adapter_bytes
    from service.cli import main

    path = tmp_path / "pets.safetensors"
    path.write_bytes(adapter_bytes(tiny_clip_dir, "pets"))
    assert main(["adapters", "inspect", str(path)]) == 0
    assert "pets" in capsys.readouterr().out
    assert main(["adapters", "validate", str(path), "--backbone", str(tiny_clip_dir)]) == 0
    assert "ok" in capsys.readouterr().out


def test_every_literal_option_parses_its_choices(monkeypatch):
    from service import cli

    captured = {}
    monkeypatch.setattr(cli, "serve", lambda overrides: captured.update(overrides) or 0)
    for dtype in ("auto", "float32", "bfloat16", "float16"):
        assert cli.main(["serve", "--dtype", dtype]) == 0
        assert Settings(**captured).dtype == dtype
