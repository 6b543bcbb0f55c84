"""A first run that explains itself: strict settings, a start-up report, model sources
checked before any port opens, stable model names. Subprocesses run with the hub
unreachable or HF_HUB_OFFLINE=1: nothing here reaches the network."""

from __future__ import annotations

import base64
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from fixtures.images import encode, make_image
from service import cli
from service.settings import DEFAULT_CLIP, load_settings, unknown_environment
from tests.conftest import running_app
from tests.llava_fixtures import save_tiny_llava
from tests.test_cli import free_port, serve, wait_ready


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("first-run") / "my-llava")


def run_cli(args: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``promptswap ARGS`` in a fresh process with an empty hub cache of its own."""
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env={
            **os.environ,
            "HF_HOME": str(tmp_path / "hf"),
            "PROMPTSWAP_ADAPTER_DIR": str(tmp_path / "s"),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=300,
    )


# ------------------------------------------------------------------ settings


def test_unknown_or_bad_environment_settings_stop_the_start(monkeypatch, capsys):
    monkeypatch.setenv("PROMPTSWAP_MAX_BATCHSIZE", "64")
    assert cli.main(["serve", "--clip-model", ""]) == 2
    err = capsys.readouterr().err
    assert (
        "unknown setting PROMPTSWAP_MAX_BATCHSIZE in the environment; did you mean PROMPTSWAP_MAX_BATCH_SIZE?"
        in err
    )
    monkeypatch.delenv("PROMPTSWAP_MAX_BATCHSIZE")
    monkeypatch.setenv("PROMPTSWAP_MAX_BATCH_SIZE", "lots")
    assert cli.main(["serve", "--clip-model", ""]) == 2
    assert "PROMPTSWAP_MAX_BATCH_SIZE='lots': Input should be a valid integer" in capsys.readouterr().err
    monkeypatch.delenv("PROMPTSWAP_MAX_BATCH_SIZE")
    assert cli.main(["serve", "--clip-model", "", "--max-queue", "0"]) == 2
    assert "--max-queue 0: Input should be greater than or equal to 1" in capsys.readouterr().err


def test_the_test_suites_own_variables_are_not_settings():
    # CI exports PROMPTSWAP_TEST_ARTIFACTS and PROMPTSWAP_REQUIRE_CLUSTER_TOOLS beside real settings.
    env = {"PROMPTSWAP_TEST_ARTIFACTS": "/tmp/a", "PROMPTSWAP_REQUIRE_CLUSTER_TOOLS": "1"}
    assert unknown_environment(env) == []
    assert unknown_environment({**env, "PROMPTSWAP_TESTING": "1"}) != []


async def test_the_start_up_report_shows_every_setting_and_hides_secrets(make_settings, caplog, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("k-one\nk-two\n")
    settings = make_settings(admin_token="very-secret-admin", api_keys_file=keys)
    with caplog.at_level(logging.INFO, logger="promptswap"):
        async with running_app(settings):
            pass
    text = caplog.text
    assert "very-secret-admin" not in text and "k-one" not in text
    assert "admin_token = set (hidden)" in text and "admin API: on" in text
    assert f"API keys: on (2 keys from {keys})" in text
    assert f"adapter store: {settings.adapter_dir}" in text
    block = next(r.getMessage() for r in caplog.records if "starting" in r.getMessage())
    for name in type(settings).model_fields:
        assert f"\n  {name} = " in block, name  # one block, every setting
    model = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("model clip:"))
    assert f"id {Path(settings.clip_model).name!r}" in model and "on cpu as float32, loaded in" in model


# ------------------------------------------------------------------ sources


def test_the_default_clip_only_when_no_model_is_named(llava_dir):
    assert load_settings({}).clip_model == DEFAULT_CLIP
    assert load_settings({"llava_model": str(llava_dir)}).clip_model is None
    assert load_settings({"clip_model": ""}).clip_model == ""


def test_a_missing_local_path_says_so(capsys, tmp_path):
    assert cli.main(["serve", "--clip-model", "./no-such-clip"]) == 2
    assert "--clip-model './no-such-clip': no such directory" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert cli.main(["serve", "--llava-model", str(tmp_path / "file")]) == 2
    assert "is a file; give the checkpoint's directory" in capsys.readouterr().err


@pytest.mark.slow
def test_an_unfetchable_hub_id_fails_fast_once_before_listening(tmp_path):
    offline = run_cli(["serve", "--port", str(free_port())], {"HF_HUB_OFFLINE": "1"}, tmp_path)
    dead_hub = run_cli(
        ["serve", "--clip-model", "my-local-clip", "--port", str(free_port())],
        {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"},
        tmp_path,
    )
    for result in (offline, dead_hub):
        out = result.stdout + result.stderr
        assert result.returncode == 2, out
        assert "Uvicorn running" not in out and "startup complete" not in out  # never listened
        assert "Retrying" not in out and out.count("promptswap:") == 1  # once, no retry storm
        assert "--clip-model ./DIR" in out and "HF_HOME" in out and "HF_HUB_OFFLINE=1" in out
    assert f"--clip-model '{DEFAULT_CLIP}': HF_HUB_OFFLINE is set and the model is not in the hub cache" in (
        offline.stderr
    )
    assert "cannot reach the model hub" in dead_hub.stderr
    assert "there is no local directory 'my-local-clip' either" in dead_hub.stderr


def hub_cache(home: Path, repo: str, checkpoint: Path) -> None:
    """``checkpoint`` as the hub client's cache keeps ``repo`` (refs/main -> a snapshot)."""
    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(checkpoint, root / "snapshots" / ("0" * 40))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0" * 40)


@pytest.mark.slow
def test_llava_alone_serves_chat_from_the_cache_under_its_hub_id(llava_dir, tmp_path):
    """``--llava-model HUB_ID`` alone, offline, from a cache: no CLIP is fetched, the hub id
    is the model's name, and --wait-for-models opens the port only once it is loaded."""
    home = tmp_path / "hf"
    hub_cache(home, "llava-hf/llava-1.5-7b-hf", llava_dir)
    port = free_port()
    proc = serve(
        [
            "--llava-model",
            "llava-hf/llava-1.5-7b-hf",
            "--port",
            str(port),
            "--device",
            "cpu",
            "--wait-for-models",
        ],
        env={"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"},
    )
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}")
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]
        assert [(m["id"], m["kind"]) for m in models] == [("llava-hf/llava-1.5-7b-hf", "llava")]
        image = "data:image/png;base64," + base64.b64encode(encode(make_image(0))).decode()
        body = {
            "model": "llava-hf/llava-1.5-7b-hf",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}]}],
            "max_tokens": 2,
        }
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)
        assert answer.status_code == 200 and answer.json()["model"] == "llava-hf/llava-1.5-7b-hf"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    loaded, listening = out.find("model llava: id 'llava-hf/llava-1.5-7b-hf'"), out.find("Uvicorn running")
    assert 0 <= loaded < listening, out  # loaded before the port opened
    assert "model clip" not in out


# ------------------------------------------------------------------ names


async def test_model_names_are_stable_and_each_backbone_says_what_it_serves(
    make_settings, llava_dir, tiny_clip_dir
):
    settings = make_settings(llava_model=str(llava_dir), llava_served_model_name="llava-hf/llava-1.5-7b-hf")
    image = base64.b64encode(encode(make_image(0))).decode()
    async with running_app(settings) as (client, _):
        ids = {m["id"]: m["kind"] for m in (await client.get("/v1/models")).json()["data"]}
        assert ids == {tiny_clip_dir.name: "clip", "llava-hf/llava-1.5-7b-hf": "llava"}  # no paths
        classify = await client.post("/v1/classify", json={"image": image, "labels": ["cat", "dog"]})
        assert classify.json()["model"] == tiny_clip_dir.name
        url = f"data:image/png;base64,{image}"
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
        plain = await client.post(
            "/v1/chat/completions",
            json={"model": "llava-hf/llava-1.5-7b-hf", "messages": messages, "max_tokens": 2},
        )
        assert plain.status_code == 200 and plain.json()["model"] == "llava-hf/llava-1.5-7b-hf"
        wrong = await client.post(
            "/v1/chat/completions", json={"model": tiny_clip_dir.name, "messages": messages, "max_tokens": 2}
        )
        assert wrong.status_code == 422
        assert wrong.json()["error"]["message"] == (
            f"{tiny_clip_dir.name!r} is the CLIP backbone: it serves /v1/classify; this route is served "
            "by 'llava-hf/llava-1.5-7b-hf'"
        )
        crossed = await client.post(
            "/v1/classify", json={"image": image, "labels": ["cat"], "adapter": "llava-hf/llava-1.5-7b-hf"}
        )
        assert crossed.status_code == 422
        assert "is the LLaVA backbone: it serves /v1/chat and /v1/chat/completions" in crossed.text
