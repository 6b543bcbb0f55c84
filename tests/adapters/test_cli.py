from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapters.cli import main, register
from adapters.container import MAX_HEADER_BYTES
from adapters.format import dump, read_adapter_file
from adapters.m2pt import M2ptConfig, M2ptPromptLearner, llava_fingerprint
from adapters.m2pt import fold as fold_m2pt
from adapters.maple import MapleConfig, MaplePromptLearner, clip_fingerprint, fold
from tests.adapters.conftest import tiny_clip_config
from tests.adapters.test_importers import WarmupScheduler, reference_state, save_dassl
from tests.conftest import make_image
from tests.llava_fixtures import tiny_llava_config, tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def dassl_dir(tmp_path: Path) -> Path:
    out = tmp_path / "output"
    save_dassl(
        out / "MultiModalPromptLearner" / "model.pth.tar-5", reference_state(), scheduler=WarmupScheduler()
    )
    return out


@pytest.fixture
def adapter_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "digits.safetensors"
    folded = fold(MaplePromptLearner(MapleConfig(2, 3, 64, 96)))
    path.write_bytes(
        dump(folded, name="digits", backbone=clip_fingerprint(tiny_clip_config()), description="hi")
    )
    return path


def test_import_maple(
    dassl_dir: Path, clip_config_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "imported.safetensors"
    argv = [
        "import-maple",
        str(dassl_dir),
        "--backbone",
        str(clip_config_dir),
        "--name",
        "flowers",
        "-o",
        str(out),
    ]
    assert main([*argv, "--description", "from the reference", "--ctx-init", "a_picture of"]) == 0
    assert "wrote" in capsys.readouterr().out
    adapter = read_adapter_file(out, max_bytes=1 << 20)
    assert adapter.name == "flowers" and adapter.manifest.description == "from the reference"
    from transformers import CLIPModel

    from adapters.weights import weights_digest

    assert adapter.manifest.backbone["weights"] == weights_digest(CLIPModel.from_pretrained(clip_config_dir))
    assert (adapter.folded.depth, adapter.folded.n_ctx) == (3, 2)
    assert adapter.manifest.hyperparameters["template"] == "a picture of {}."
    assert not list(tmp_path.glob("*.tmp"))


def test_import_maple_default_output(
    dassl_dir: Path, clip_config_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert (
        main(["import-maple", str(dassl_dir), "--backbone", str(clip_config_dir), "--name", "flowers"]) == 0
    )
    assert (tmp_path / "flowers.safetensors").is_file()


def test_import_maple_errors(
    dassl_dir: Path, clip_config_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["import-maple", str(dassl_dir), "--backbone", str(clip_config_dir), "-o", str(tmp_path / "x")]
    assert main([*argv, "--name", "Bad Name"]) == 1
    assert "adapter name" in capsys.readouterr().err
    assert (
        main(["import-maple", str(tmp_path / "nothing"), "--backbone", str(clip_config_dir), "--name", "x"])
        == 1
    )
    assert "no checkpoint" in capsys.readouterr().err
    assert (
        main(["import-maple", str(dassl_dir), "--backbone", str(tmp_path / "no-model"), "--name", "x"]) == 1
    )
    assert "error" in capsys.readouterr().err


def test_inspect(adapter_file: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(adapter_file)]) == 0
    out = capsys.readouterr().out
    manifest = json.loads(out.split("\ntext_prompts:")[0])
    assert manifest["name"] == "digits" and manifest["hyperparameters"] == {"n_ctx": 2, "depth": 3}
    assert "text_prompts: shape [3, 2, 64]" in out and "vision_prompts: shape [3, 2, 96]" in out
    assert f"folded bytes (fp32): {4 * 3 * 2 * (64 + 96)}" in out


def test_inspect_rejects_garbage(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "x.safetensors").write_bytes(b"\x80\x04garbage")
    assert main(["inspect", str(tmp_path / "x.safetensors")]) == 1
    assert "not a safetensors adapter" in capsys.readouterr().err


def test_validate(
    adapter_file: Path, clip_config_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["validate", str(adapter_file), "--backbone", str(clip_config_dir)]) == 0
    assert capsys.readouterr().out.strip() == "ok"
    other = tmp_path / "other-clip"
    tiny_clip_config(vision_layers=6).save_pretrained(other)
    assert main(["validate", str(adapter_file), "--backbone", str(other)]) == 1
    assert "vision_layers expected 6, got 4" in capsys.readouterr().err


@pytest.mark.slow  # a real process: about 10 s
def test_runs_as_a_module(adapter_file: Path, clip_config_dir: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable,
        "-m",
        "adapters.cli",
        "validate",
        str(adapter_file),
        "--backbone",
        str(clip_config_dir),
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.fixture
def m2pt_file(tmp_path: Path) -> tuple[Path, Path]:
    """An m2pt adapter file and the tiny LLaVA config directory it was made for."""
    config = tiny_llava_config(tiny_tokenizer(), vision_layers=3, text_layers=3)
    llava_dir = tmp_path / "tiny-llava"
    config.save_pretrained(llava_dir)
    torch.manual_seed(0)
    folded = fold_m2pt(M2ptPromptLearner(M2ptConfig.for_llava(config, n_vision=2, n_text=3)))
    path = tmp_path / "answers.safetensors"
    path.write_bytes(dump(folded, name="answers", backbone=llava_fingerprint(config)))
    return path, llava_dir


def test_inspect_m2pt(m2pt_file: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    path, _ = m2pt_file
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    manifest = json.loads(out.split("\nvision_prompts:")[0])
    assert manifest["method"] == "m2pt" and manifest["backbone"]["arch"] == "llava"
    adapter = read_adapter_file(path, max_bytes=1 << 22)
    for name, t in adapter.tensors().items():
        assert f"{name}: shape {list(t.shape)} stored F32" in out
    assert len(adapter.tensors()) == 4
    assert f"folded bytes (fp32): {adapter.folded.nbytes}" in out


def test_validate_m2pt(
    m2pt_file: tuple[Path, Path], clip_config_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path, llava_dir = m2pt_file
    assert main(["validate", str(path), "--backbone", str(llava_dir)]) == 0
    assert capsys.readouterr().out.strip() == "ok"
    assert main(["validate", str(path), "--backbone", str(clip_config_dir)]) == 1
    assert "a m2pt adapter needs a llava backbone" in capsys.readouterr().err
    deeper = tmp_path / "deeper-llava"
    tiny_llava_config(tiny_tokenizer(), vision_layers=4, text_layers=3).save_pretrained(deeper)
    assert main(["validate", str(path), "--backbone", str(deeper)]) == 1
    assert "vision_layers expected 4, got 3" in capsys.readouterr().err


def test_a_jpeg_is_not_a_safetensors_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    photo = tmp_path / "photo.safetensors"
    make_image(0, (64, 48)).save(photo, format="JPEG")
    # The JPEG's first 8 bytes read as a header length far past the bound: say what it is instead.
    assert int.from_bytes(photo.read_bytes()[:8], "little") > MAX_HEADER_BYTES
    for cmd in (["inspect", str(photo)], ["validate", str(photo), "--backbone", "unused"]):
        assert main(cmd) == 1
        err = capsys.readouterr().err
        assert "not a safetensors file (it looks like a JPEG image)" in err
        assert not any(ch.isdigit() for ch in err), err


@pytest.mark.parametrize("method", ["maple", "m2pt"])
def test_every_train_option_has_a_help_text_and_one_true_default(method: str) -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    train = next(a for a in parser._subparsers._group_actions if "train" in a.choices).choices["train"]
    sub = next(a for a in train._subparsers._group_actions if method in a.choices).choices[method]
    formatter = sub._get_formatter()
    options = [a for a in sub._actions if a.dest != "help"]
    assert {"resume", "upload", "token", "checkpoint_dir", "weight_decay", "batch_size", "seed"} <= {
        a.dest for a in options
    }
    for action in options:
        assert action.help, f"{action.option_strings} has no help text"
        text = formatter._expand_help(action)
        assert text.count("(default:") <= 1 and "(default: None)" not in text, text
        if action.default not in (None, False, "") and not action.required:
            assert f"(default: {action.default})" in text, text  # the value the option really takes
