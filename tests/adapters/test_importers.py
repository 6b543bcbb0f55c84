"""Importing MaPLe reference (Dassl) checkpoints, and never running code from them."""

from __future__ import annotations

import io
import os
import pickle
import random
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from adapters.errors import AdapterError, AdapterFormatError, AdapterMismatch, AdapterValueError
from adapters.format import load_adapter
from adapters.importers import (
    Inert,
    convert_maple_checkpoint,
    import_maple_checkpoint,
    read_checkpoint_restricted,
    resolve_checkpoint,
)
from adapters.maple import MapleConfig, clip_fingerprint, fold
from tests.adapters.conftest import tiny_clip_config

CONFIG = MapleConfig(n_ctx=2, depth=3, text_width=64, vision_width=96)


class CosineScheduler:
    """Stands in for torch's LR scheduler objects inside Dassl's warm-up scheduler."""

    def __init__(self) -> None:
        self.T_max, self.last_epoch, self.optimizer = 5, 4, {"param_groups": [{"lr": 0.0035}]}


class WarmupScheduler(dict):
    """Like Dassl's GradualWarmupScheduler state: keeps its successor object (not plain data)."""

    def __init__(self) -> None:
        super().__init__(successor=CosineScheduler(), warmup_epoch=1)
        self.last_epoch = 4


class RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class WritesFile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def reference_state(seed: int = 0, *, n_cls: int = 3) -> OrderedDict[str, torch.Tensor]:
    """CustomCLIP.state_dict() as a PREC=fp16 run saves it: ctx/proj fp16, deep prompts fp32."""
    g = torch.Generator().manual_seed(seed)
    n, dt, dv = CONFIG.n_ctx, CONFIG.text_width, CONFIG.vision_width
    s: OrderedDict[str, torch.Tensor] = OrderedDict()
    s["prompt_learner.ctx"] = torch.randn(n, dt, generator=g).half()
    for i in range(CONFIG.depth - 1):
        s[f"prompt_learner.compound_prompts_text.{i}"] = torch.randn(n, dt, generator=g)
    s["prompt_learner.token_prefix"] = torch.randn(n_cls, 1, dt, generator=g).half()
    s["prompt_learner.token_suffix"] = torch.randn(n_cls, 77 - 1 - n, dt, generator=g).half()
    s["prompt_learner.proj.weight"] = (torch.randn(dv, dt, generator=g) * 0.1).half()
    s["prompt_learner.proj.bias"] = (torch.randn(dv, generator=g) * 0.1).half()
    for i in range(CONFIG.depth - 1):
        s[f"prompt_learner.compound_prompt_projections.{i}.weight"] = torch.randn(dv, dt, generator=g) * 0.1
        s[f"prompt_learner.compound_prompt_projections.{i}.bias"] = torch.randn(dv, generator=g) * 0.1
    s["image_encoder.conv1.weight"] = torch.randn(dv, 3, 16, 16, generator=g).half()
    s["text_encoder.ln_final.weight"] = torch.ones(dt).half()
    s["logit_scale"] = torch.tensor(4.6052).half()
    return s


def save_dassl(path: Path, state: dict, *, scheduler: object, epoch: int = 5) -> Path:
    """Dassl save_checkpoint's dict, written with torch.save."""
    path.parent.mkdir(parents=True, exist_ok=True)
    optimizer = {
        "state": {0: {"momentum_buffer": torch.zeros(2, 64)}},
        "param_groups": [{"lr": 0.0035, "params": [0]}],
    }
    torch.save(
        {
            "state_dict": state,
            "epoch": epoch,
            "optimizer": optimizer,
            "scheduler": scheduler,
            "val_result": None,
        },
        path,
    )
    return path


@pytest.fixture
def hostile_checkpoint(tmp_path: Path) -> tuple[Path, list[Path]]:
    markers = [tmp_path / "shell-ran", tmp_path / "file-written"]
    scheduler = {"sched": WarmupScheduler(), "a": RunsShell(markers[0]), "b": WritesFile(markers[1])}
    path = save_dassl(
        tmp_path / "out" / "MultiModalPromptLearner" / "model.pth.tar-5",
        reference_state(),
        scheduler=scheduler,
    )
    return path, markers


def test_weights_only_refuses_a_dassl_checkpoint(hostile_checkpoint: tuple[Path, list[Path]]) -> None:
    # the premise of the restricted reader: torch's safe loader will not read these files
    path, markers = hostile_checkpoint
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    assert not any(m.exists() for m in markers)


def test_import_never_runs_code(hostile_checkpoint: tuple[Path, list[Path]]) -> None:
    path, markers = hostile_checkpoint
    imported = import_maple_checkpoint(path)
    assert not any(m.exists() for m in markers), "the checkpoint executed code"
    assert imported.epoch == 5 and imported.source == path
    assert imported.learner.config == CONFIG


def test_restricted_reader_turns_objects_into_inert_records(
    hostile_checkpoint: tuple[Path, list[Path]],
) -> None:
    path, markers = hostile_checkpoint
    ckpt = read_checkpoint_restricted(path)
    shell = ckpt["scheduler"]["a"]
    assert isinstance(shell, Inert) and shell.qualname == "system" and shell.args == (f"touch {markers[0]}",)
    assert isinstance(ckpt["scheduler"]["b"], Inert) and ckpt["scheduler"]["b"].qualname == "open"
    sched = ckpt["scheduler"]["sched"]
    assert isinstance(sched, Inert) and sched.qualname == "WarmupScheduler"
    assert ("warmup_epoch", 1) in sched.items
    assert isinstance(ckpt["state_dict"], OrderedDict)
    assert torch.equal(ckpt["state_dict"]["prompt_learner.ctx"], reference_state()["prompt_learner.ctx"])
    assert not any(m.exists() for m in markers)


def test_fp16_becomes_fp32_with_the_same_values(hostile_checkpoint: tuple[Path, list[Path]]) -> None:
    path, _ = hostile_checkpoint
    learner = import_maple_checkpoint(path).learner
    ref = reference_state()
    assert all(p.dtype == torch.float32 for p in learner.parameters())
    assert torch.equal(learner.ctx.detach(), ref["prompt_learner.ctx"].float())
    assert torch.equal(learner.proj.weight.detach(), ref["prompt_learner.proj.weight"].float())
    assert torch.equal(
        learner.compound_prompts_text[1].detach(), ref["prompt_learner.compound_prompts_text.1"]
    )
    folded = fold(learner)
    expected = (
        ref["prompt_learner.compound_prompt_projections.0.weight"]
        @ ref["prompt_learner.compound_prompts_text.0"].T
    )
    torch.testing.assert_close(
        folded.vision[1], expected.T + ref["prompt_learner.compound_prompt_projections.0.bias"]
    )


def test_plain_checkpoint_uses_weights_only(tmp_path: Path) -> None:
    path = save_dassl(tmp_path / "model.pth.tar-1", reference_state(1), scheduler=None, epoch=1)
    torch.load(path, weights_only=True)  # loads fine, so the safe path is the one taken
    assert torch.equal(
        import_maple_checkpoint(path).learner.ctx.detach(), reference_state(1)["prompt_learner.ctx"].float()
    )


def test_bare_prompt_learner_state(tmp_path: Path) -> None:
    state = {
        k.removeprefix("prompt_learner."): v
        for k, v in reference_state().items()
        if k.startswith("prompt_learner.")
    }
    torch.save(state, tmp_path / "learner.pt")
    assert import_maple_checkpoint(tmp_path / "learner.pt").learner.config == CONFIG


def test_dassl_directory_layout(tmp_path: Path) -> None:
    d = tmp_path / "output" / "MultiModalPromptLearner"
    for epoch in (2, 10):
        save_dassl(d / f"model.pth.tar-{epoch}", reference_state(epoch), scheduler=None, epoch=epoch)
    assert resolve_checkpoint(tmp_path / "output") == d / "model.pth.tar-10"  # highest epoch
    (d / "checkpoint").write_text("model.pth.tar-2\n")
    assert resolve_checkpoint(tmp_path / "output") == d / "model.pth.tar-2"  # the marker names the latest
    assert resolve_checkpoint(d) == d / "model.pth.tar-2"
    assert import_maple_checkpoint(tmp_path / "output").epoch == 2
    (d / "checkpoint").write_text("../../etc/passwd\n")
    with pytest.raises(AdapterFormatError, match="does not name"):
        resolve_checkpoint(d)
    with pytest.raises(AdapterFormatError, match="no checkpoint"):
        resolve_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterFormatError, match="no MaPLe checkpoint"):
        resolve_checkpoint(tmp_path / "empty")


def test_convert_writes_a_valid_adapter(hostile_checkpoint: tuple[Path, list[Path]]) -> None:
    path, _ = hostile_checkpoint
    config = tiny_clip_config()
    adapter = load_adapter(convert_maple_checkpoint(path, config, name="imported"), max_bytes=1 << 20)
    assert adapter.manifest.backbone == clip_fingerprint(config)
    assert adapter.manifest.hyperparameters == {
        "n_ctx": 2, "depth": 3, "epoch": 5, "source": "maple-reference",
        "ctx_init": "a photo of a", "template": "a photo of a {}.",
    }  # fmt: skip
    assert torch.equal(adapter.folded.text[0], reference_state()["prompt_learner.ctx"].float())


def test_convert_records_ctx_init_as_template(hostile_checkpoint: tuple[Path, list[Path]]) -> None:
    path, _ = hostile_checkpoint
    data = convert_maple_checkpoint(path, tiny_clip_config(), name="x", ctx_init="X  X")
    assert load_adapter(data, max_bytes=1 << 20).manifest.hyperparameters["template"] == "X X {}."
    with pytest.raises(AdapterValueError, match="fewer words"):
        convert_maple_checkpoint(path, tiny_clip_config(), name="x", ctx_init="photo")


def test_convert_refuses_another_backbone(hostile_checkpoint: tuple[Path, list[Path]]) -> None:
    path, _ = hostile_checkpoint
    config = tiny_clip_config()
    config.text_config.hidden_size = 512
    with pytest.raises(AdapterMismatch, match="text_width expected 512, got 64"):
        convert_maple_checkpoint(path, config, name="x")
    with pytest.raises(AdapterMismatch, match="depth 3"):
        convert_maple_checkpoint(path, tiny_clip_config(text_layers=2), name="x")


def test_rejects_non_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "random.bin").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(2000)))
    (tmp_path / "text.txt").write_text("hello")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", "not torch")
    for name in ("random.bin", "text.txt", "other.zip"):
        with pytest.raises(AdapterFormatError):
            import_maple_checkpoint(tmp_path / name)
    torch.save({"state_dict": {"image_encoder.w": torch.zeros(2)}}, tmp_path / "no-learner.pt")
    with pytest.raises(AdapterFormatError, match="not a MaPLe checkpoint"):
        import_maple_checkpoint(tmp_path / "no-learner.pt")


def test_rejects_non_finite_prompts(tmp_path: Path) -> None:
    state = reference_state()
    state["prompt_learner.compound_prompts_text.0"][0, 0] = float("nan")
    save_dassl(tmp_path / "m.pth.tar", state, scheduler=None)
    with pytest.raises(AdapterValueError, match="compound_prompts_text.0"):
        import_maple_checkpoint(tmp_path / "m.pth.tar")


def test_mutated_checkpoints_fail_only_with_typed_errors(
    hostile_checkpoint: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    path, markers = hostile_checkpoint
    with zipfile.ZipFile(path) as z:
        records = {i.filename: z.read(i.filename) for i in z.infolist()}
    pkl_name = next(n for n in records if n.endswith("data.pkl"))
    rng = random.Random(0)
    for trial in range(60):
        pkl = bytearray(records[pkl_name])
        for _ in range(rng.randint(1, 4)):
            pkl[rng.randrange(len(pkl))] = rng.randrange(256)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for name, data in records.items():
                z.writestr(name, bytes(pkl) if name == pkl_name else data)
        target = tmp_path / f"mutant-{trial}.pth.tar"
        target.write_bytes(buf.getvalue())
        for reader in (
            import_maple_checkpoint,
            read_checkpoint_restricted,
        ):  # the latter: no torch.load first
            try:
                reader(target)
            except AdapterError:
                pass
    assert not any(m.exists() for m in markers)
