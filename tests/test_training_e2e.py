"""From an image folder to a served adapter: train on digits, upload, classify over HTTP.

The backbone is the service tests' tiny CLIP (image 224, patch 32, real tokenizer), so
the trainer and the service run the very same model from the same directory.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from httpx import ASGITransport, AsyncClient

from adapters import upload as upload_module
from adapters.cli import main as adapters_main
from adapters.format import read_adapter_file, validate_for_backbone
from adapters.maple import clip_fingerprint
from adapters.training_maple import TrainConfig, Trainer, load_backbone
from adapters.upload import upload_adapter
from tests.adapters.test_training_data import digits_dir, render_digits  # noqa: F401  (fixture)
from tests.conftest import running_app

TOKEN = "train-e2e-token"
TEMPLATE = "a photo of a {}."


# Tiny models: one intra-op thread is faster and far steadier on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
async def test_digits_adapter_beats_zero_shot_and_serves_its_own_predictions(
    tiny_clip_dir: Path, digits_dir: Path, make_settings, tmp_path: Path  # noqa: F811
) -> None:  # fmt: skip
    config = TrainConfig(
        backbone=str(tiny_clip_dir), data=str(digits_dir), output=str(tmp_path / "digits.safetensors"),
        shots=16, epochs=1000, max_steps=150, n_ctx=2, depth=4, lr=0.01, batch_size=32, seed=0,
        template=TEMPLATE, eval_fraction=0.2, eval_every=1000, device="cpu",
    )  # fmt: skip
    model, processor = load_backbone(config.backbone, torch.device("cpu"))
    result = Trainer(config, model, processor).run()
    print(f"zero-shot {result.zero_shot_accuracy:.1%} adapter {result.accuracy:.1%} "
          f"({result.steps} steps, {result.seconds:.1f} s, {len(result.held_out)} held out)")  # fmt: skip
    assert result.accuracy - result.zero_shot_accuracy >= 0.30

    # All 332 held-out images at once: the queue must admit them all (arriving ones count).
    async with running_app(make_settings(admin_token=TOKEN, max_queue=1024)) as (client, _):
        answer = await upload_adapter(result.adapter, "http://test", TOKEN, client=client)
        assert answer["key"] == "digits@1"

        async def top1(path: Path) -> int:
            response = await client.post(
                "/v1/classify",
                files={"image": (path.name, path.read_bytes())},
                data={"labels": result.classes, "template": TEMPLATE, "adapter": "digits", "top_k": 1},
            )
            assert response.status_code == 200, response.text
            return result.classes.index(response.json()["labels"][0]["label"])

        served = await asyncio.gather(*(top1(path) for path, _ in result.held_out))
    assert served == result.predictions


async def test_cli_trains_and_uploads_to_the_app(
    tiny_clip_dir: Path,
    make_settings,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = render_digits(tmp_path / "digits", limit=200)
    out = tmp_path / "tiny-digits.safetensors"
    argv = [
        "train", "maple", "--backbone", str(tiny_clip_dir), "--data", str(data), "-o", str(out),
        "--shots", "2", "--epochs", "2", "--n-ctx", "2", "--depth", "2", "--batch-size", "8",
        "--eval-fraction", "0.1", "--device", "cpu",
    ]  # fmt: skip
    assert adapters_main(argv) == 0
    printed = capsys.readouterr()
    assert "zero-shot" in printed.out and "adapter" in printed.out and "step      6/6" in printed.err
    adapter = read_adapter_file(out, max_bytes=1 << 20)
    from transformers import CLIPConfig

    validate_for_backbone(adapter, clip_fingerprint(CLIPConfig.from_pretrained(tiny_clip_dir)))
    assert adapter.name == "tiny-digits" and adapter.manifest.hyperparameters["steps"] == 6
    assert (tmp_path / "tiny-digits.safetensors.ckpt" / "last.safetensors").is_file()

    async with running_app(make_settings(admin_token=TOKEN)) as (client, app):
        # The command makes its own client; point it at the in-process app.
        monkeypatch.setattr(
            upload_module, "new_client", lambda: AsyncClient(transport=ASGITransport(app=app))
        )
        monkeypatch.setenv("PROMPTSWAP_ADMIN_TOKEN", TOKEN)
        assert await asyncio.to_thread(adapters_main, ["upload", str(out), "--url", "http://test"]) == 0
        printed = capsys.readouterr()
        assert "uploaded as tiny-digits@1" in printed.out and TOKEN not in printed.out + printed.err
        listing = (await client.get("/v1/adapters")).json()["adapters"]
        assert [a["name"] for a in listing] == ["tiny-digits"]

        monkeypatch.setenv("PROMPTSWAP_ADMIN_TOKEN", "wrong-" + TOKEN)
        assert await asyncio.to_thread(adapters_main, ["upload", str(out), "--url", "http://test"]) == 1
        printed = capsys.readouterr()
        assert "HTTP 401" in printed.err and TOKEN not in printed.out + printed.err

    monkeypatch.delenv("PROMPTSWAP_ADMIN_TOKEN")
    assert adapters_main(["upload", str(out), "--url", "http://test"]) == 1
    assert "PROMPTSWAP_ADMIN_TOKEN" in capsys.readouterr().err
