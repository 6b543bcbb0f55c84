"""MaPLe training: frozen backbone, resumable and atomic checkpoints, CLI wiring."""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import CLIPModel

from adapters import checkpoint
from adapters.checkpoint import load_checkpoint
from adapters.errors import AdapterValueError
from adapters.format import load_adapter
from adapters.training_maple import TrainConfig, Trainer, load_backbone
from adapters.weights import weights_digest
from tests.adapters.test_training_data import render_digits

# Tiny models: one intra-op thread is faster and far steadier on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render_digits(tmp_path_factory.mktemp("small-digits"), limit=300)  # ~30 per class


def small_config(clip: Path, data: Path, tmp: Path, **kw: object) -> TrainConfig:
    # 40 training images, batch 16: 3 steps per epoch, so step 4 is mid-epoch.
    values: dict[str, object] = {
        "backbone": str(clip), "data": str(data), "output": str(tmp / "a.safetensors"), "shots": 4,
        "epochs": 3, "n_ctx": 2, "depth": 4, "batch_size": 16, "seed": 7, "eval_fraction": 0.2,
        "device": "cpu", "checkpoint_dir": str(tmp / "ckpt"),
    }  # fmt: skip
    return TrainConfig(**(values | kw))  # type: ignore[arg-type]


def trainer(config: TrainConfig, **kw: object) -> Trainer:
    model, processor = load_backbone(config.backbone, torch.device(config.device))
    return Trainer(config, model, processor, log=io.StringIO(), **kw)  # type: ignore[arg-type]


def adapter_sha(data: bytes) -> str:
    return load_adapter(data, max_bytes=1 << 20).manifest.tensors_sha256


def test_only_prompts_train_backbone_bit_identical(
    tiny_clip_dir: Path, small_digits: Path, tmp_path: Path
) -> None:
    t = trainer(small_config(tiny_clip_dir, small_digits, tmp_path, epochs=1))
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    assert not any(p.requires_grad for p in t.model.parameters())
    optimized = {id(p) for group in t.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in t.learner.parameters()}
    ctx0 = t.learner.ctx.detach().clone()
    result = t.run()
    after = t.model.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []
    assert not torch.equal(ctx0, t.learner.ctx.detach())  # the prompts did move
    assert result.steps == 3
    hp = load_adapter(result.adapter, max_bytes=1 << 20).manifest.hyperparameters
    assert hp["template"] == "a photo of a {}." and hp["shots"] == 4 and hp["steps"] == 3 and hp["seed"] == 7
    assert hp["held_out_accuracy"] == round(result.accuracy, 6)
    assert hp["zero_shot_accuracy"] == round(result.zero_shot_accuracy, 6)
    # the fingerprint names the checkpoint's weights, not only its shapes
    backbone = load_adapter(result.adapter, max_bytes=1 << 20).manifest.backbone
    assert backbone["weights"] == weights_digest(CLIPModel.from_pretrained(tiny_clip_dir))


def test_ctx_starts_from_the_template_words(tiny_clip_dir: Path, small_digits: Path, tmp_path: Path) -> None:
    t = trainer(small_config(tiny_clip_dir, small_digits, tmp_path))
    embed = t.model.text_model.embeddings.token_embedding.weight
    assert torch.equal(t.learner.ctx.detach(), embed[t.ids[0, 1:3]])  # "a", "photo"
    with pytest.raises(AdapterValueError, match="tokens before the label"):
        trainer(small_config(tiny_clip_dir, small_digits, tmp_path, template="{} digit"))


def test_interrupt_then_resume_equals_uninterrupted(
    tiny_clip_dir: Path, small_digits: Path, tmp_path: Path
) -> None:
    whole = trainer(small_config(tiny_clip_dir, small_digits, tmp_path / "whole", max_steps=7)).run()

    def ctrl_c_at_4(step: int) -> None:
        if step == 4:  # mid-epoch: the checkpoint must carry the optimizer and schedule
            raise KeyboardInterrupt

    config = small_config(tiny_clip_dir, small_digits, tmp_path / "cut", max_steps=7)
    with pytest.raises(KeyboardInterrupt):
        trainer(config, on_step=ctrl_c_at_4).run()
    tensors, meta = load_checkpoint(config.checkpoint_path())
    assert meta["step"] == 4 and "optimizer.state.0.exp_avg" in tensors and "rng.torch" in tensors

    config.resume = True
    resumed = trainer(config).run()
    assert resumed.steps == whole.steps == 7
    assert adapter_sha(resumed.adapter) == adapter_sha(whole.adapter)  # bit-identical prompts
    assert resumed.predictions == whole.predictions and resumed.accuracy == whole.accuracy
    assert resumed.history == whole.history

    with pytest.raises(AdapterValueError, match="lr differ"):
        trainer(
            small_config(tiny_clip_dir, small_digits, tmp_path / "cut", max_steps=7, lr=0.02, resume=True)
        ).run()


def test_checkpoint_write_is_atomic(
    tiny_clip_dir: Path, small_digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = small_config(tiny_clip_dir, small_digits, tmp_path, epochs=1)
    t = trainer(config)
    t.run()
    path = config.checkpoint_path()
    good = path.read_bytes()
    with safe_open(str(path), framework="pt") as f:  # plain safetensors: tensors + JSON, no pickle
        assert "learner.ctx" in f.keys()  # noqa: SIM118 (safe_open is no dict)
        assert "promptswap_train" in (f.metadata() or {})

    real_fsync = os.fsync
    calls = {"n": 0}

    def ctrl_c_in_fsync(fd: int) -> None:
        calls["n"] += 1
        raise KeyboardInterrupt  # the new bytes are written, not yet renamed

    monkeypatch.setattr(checkpoint.os, "fsync", ctrl_c_in_fsync)
    t.step += 1  # a different state, so a torn write would show
    with pytest.raises(KeyboardInterrupt):
        t.save(path)
    monkeypatch.setattr(checkpoint.os, "fsync", real_fsync)
    assert calls["n"] == 1
    assert path.read_bytes() == good  # the old checkpoint, whole
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left
    assert load_checkpoint(path)[1]["step"] == 3


def test_real_ctrl_c_finishes_the_step_then_checkpoints(
    tiny_clip_dir: Path, small_digits: Path, tmp_path: Path
) -> None:
    config = small_config(tiny_clip_dir, small_digits, tmp_path)

    def press_ctrl_c(step: int) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # delivered to the trainer's deferring handler

    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN under `cmd &` in a script
    with pytest.raises(KeyboardInterrupt):
        trainer(config, on_step=press_ctrl_c).run()
    assert load_checkpoint(config.checkpoint_path())[1]["step"] == 2
    assert signal.getsignal(signal.SIGINT) is before  # the handler given back
