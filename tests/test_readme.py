"""The README runs: its settings table matches ``promptswap serve --help``, and the examples
marked ``<!-- readme-test: NAME -->`` run as written against a real server, with tiny local
models standing in for the hub ids (offline: HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.adapters import adapter_bytes
from fixtures.images import encode, make_image
from service.cli import build_parser, shown_default
from service.settings import Settings
from tests.llava_fixtures import save_tiny_llava
from tests.test_cli import free_port, wait_ready

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_blocks() -> dict[str, tuple[str, str]]:
    """Marked code blocks by name: (language, code)."""
    pattern = r"<!-- readme-test: ([\w-]+) -->\n```(\w+)\n(.*?)\n```"
    return {name: (lang, code) for name, lang, code in re.findall(pattern, README.read_text(), re.DOTALL)}


# ------------------------------------------------------------------ the settings table


def settings_table() -> dict[str, tuple[str, str]]:
    """``--option`` -> (default cell, what cell), rows of two options split in two."""
    section = README.read_text().split("## Settings and bounds", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[str, str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) != 3 or not cells[0].startswith("`--"):
            continue
        options = re.findall(r"`(--[a-z-]+)`", cells[0])
        # a row of several options lists their defaults in order, comma-separated
        defaults = cells[1].replace("`", "").split(", ") if len(options) > 1 else [cells[1]]
        for option, default in zip(options, defaults, strict=True):
            assert option not in rows, f"{option} has two rows"
            rows[option] = (default.strip("`").replace("`", ""), cells[2])
    return rows


UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def normal(value: str) -> object:
    """A default as written, compared by value: '20 MiB' == 20971520, '5' == 5.0, '(unset)' == 'unset'."""
    value = value.strip()
    number = re.fullmatch(r"(\d[\d,]*(?:\.\d+)?)\s*(KiB|MiB|GiB)?", value)
    if number:
        return float(number[1].replace(",", "")) * UNITS.get(number[2] or "", 1)
    return value.removeprefix("(").removesuffix(")") if value == "(unset)" else value


def test_the_readme_settings_table_matches_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    table = settings_table()
    options = {"--" + name.replace("_", "-"): name for name in Settings.model_fields}
    assert set(table) == set(options), "README table vs Settings: " + str(set(table) ^ set(options))
    for option, (default, what) in table.items():
        shown = shown_default(options[option])
        assert f"Default: {shown}." in help_text, option
        assert normal(default) == normal(shown), f"{option}: README says {default!r}, --help {shown!r}"
        assert what, option


def test_normal_compares_by_value():
    assert normal("20 MiB") == normal(str(20 * 2**20)) and normal("32,000") == normal("32000")
    assert normal("5") == normal("5.0") and normal("unset") == normal("(unset)")
    assert normal("64 MiB") != normal(str(20 * 2**20))


# ------------------------------------------------------------------ the examples run


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path) -> Path:
    """The files the examples name: ./my-local-clip, ./my-llava, cat.jpg, pets.safetensors."""
    root = tmp_path_factory.mktemp("readme")
    shutil.copytree(tiny_clip_dir, root / "my-local-clip")
    save_tiny_llava(root / "my-llava")
    # Room for the examples' default max_tokens (256) after the prompt, as a real LLaVA has.
    config_file = root / "my-llava" / "config.json"
    config = json.loads(config_file.read_text())
    config["text_config"]["max_position_embeddings"] = 1024
    config_file.write_text(json.dumps(config))
    (root / "cat.jpg").write_bytes(encode(make_image(0), "JPEG"))
    (root / "pets.safetensors").write_bytes(adapter_bytes(tiny_clip_dir, "pets"))
    return root


def first_command(code: str, prefix: str) -> list[str]:
    line = next(line for line in code.splitlines() if line.startswith(prefix))
    return line.split("#", 1)[0].split()[2:]  # after "promptswap serve"


def shell(code: str, port: int, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a README block with bash -e, curl failing on an HTTP error, against ``port``."""
    script = "set -euo pipefail\n" + code.replace("localhost:8000", f"localhost:{port}")
    script = script.replace("curl -s ", "curl -sS --fail-with-body ").replace(
        "curl -sN ", "curl -sSN --fail-with-body "
    )
    return subprocess.run(
        ["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_the_readme_examples_run(workdir: Path):
    blocks = readme_blocks()
    assert {"serve", "endpoints", "openai", "upload"} <= set(blocks)
    token = "readme-admin-token"
    port = free_port()
    # The README's first `serve` line, on a free port, with the chat backbone the chat examples
    # need, served under the hub id the OpenAI example names.
    args = first_command(blocks["serve"][1], "promptswap serve --clip-model")
    args[args.index("--port") + 1] = str(port)
    env = {"PROMPTSWAP_ADMIN_TOKEN": token, "PROMPTSWAP_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", *args, "--llava-model", "./my-llava"]
        + ["--llava-served-model-name", "llava-hf/llava-1.5-7b-hf"]
        + ["--clip-served-model-name", "openai/clip-vit-base-patch16"],  # the embeddings example's
        cwd=workdir,
        env={**os.environ, "PROMPTSWAP_ADAPTER_DIR": str(workdir / "store"), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}")
        bin_dir = Path(sys.executable).parent  # `promptswap` as installed, run from the tests' venv
        run_env = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "PROMPTSWAP_ADMIN_TOKEN": token,
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        }
        help_line = shell("promptswap serve --help >/dev/null", port, workdir, run_env)
        assert help_line.returncode == 0, help_line.stderr

        endpoints = shell(blocks["endpoints"][1], port, workdir, run_env)
        assert endpoints.returncode == 0, endpoints.stdout + endpoints.stderr
        assert '"model":"openai/clip-vit-base-patch16"' in endpoints.stdout.replace(
            " ", ""
        )  # its served name
        assert '"deleted":["pets@1"]' in endpoints.stdout.replace(" ", "")

        upload = blocks["upload"][1].replace(
            "export PROMPTSWAP_ADMIN_TOKEN=...", f"export PROMPTSWAP_ADMIN_TOKEN={token}"
        )
        uploaded = shell(upload, port, workdir, run_env)
        assert uploaded.returncode == 0, uploaded.stdout + uploaded.stderr
        assert '"adapter":"pets@2"' in uploaded.stdout.replace(" ", "")  # version 1 was deleted above

        # The OpenAI example as written: its hub id is the local copy's served name.
        code = blocks["openai"][1].replace("http://localhost:8000", f"http://localhost:{port}")
        result = subprocess.run(
            [sys.executable, "-c", code],
            cwd=workdir,
            env=run_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() != ""
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


def test_every_serve_option_has_one_default_and_a_help_text():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("serve", "serve-ray"):
        sub = commands.choices[name]
        text = sub.format_help()
        assert "(default:" not in text, name  # no second, generated default
        for action in sub._actions:
            if action.dest not in Settings.model_fields:
                continue  # -h, and serve-ray's own Ray options
            assert action.help and action.help.count("Default:") == 1, (name, action.option_strings)
