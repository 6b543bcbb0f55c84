"""M2PT instruction tuning on a tiny LLaVA: the answer loss falls, greedy answers move to the target, CLI."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from httpx import ASGITransport, AsyncClient
from transformers import LlavaForConditionalGeneration

from adapters import upload as upload_module
from adapters.checkpoint import load_checkpoint
from adapters.cli import main as adapters_main
from adapters.errors import AdapterValueError
from adapters.format import load_adapter
from adapters.m2pt import llava_fingerprint
from adapters.training_m2pt import (
    M2ptTrainConfig,
    M2ptTrainer,
    collate,
    load_llava,
    read_examples,
    train_m2pt,
)
from adapters.weights import with_weights
from tests.conftest import make_image, running_app
from tests.llava_fixtures import save_tiny_llava

REPO = Path(__file__).resolve().parents[2]
TARGET = "red cat"
TOKEN = "train-m2pt-token"


# Tiny models: one intra-op thread is faster and far steadier on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sharp_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random LLaVA with its LLM's RMSNorm gains raised.

    At the random init (weights ~0.02) attention scores are ~0 whatever the keys (the
    prompts pass through RMSNorm, so their scale cannot help) and logits stay within about
    +-1: prompts could then only add a near-constant bias, never "red" after the prompt
    and "cat" after "red". Larger gains (x4 per layer, x10 final) give a model with sharp
    attention and logits, where prompt tuning can express a short answer.
    """
    directory = save_tiny_llava(tmp_path_factory.mktemp("llava"))
    model = LlavaForConditionalGeneration.from_pretrained(directory)
    lm = model.model.language_model
    with torch.no_grad():
        lm.norm.weight.mul_(10)
        for layer in lm.layers:
            layer.input_layernorm.weight.mul_(4)
            layer.post_attention_layernorm.weight.mul_(4)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def instructions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("instructions")
    (folder / "images").mkdir()
    lines = []
    asks = ["what is in the image", "describe the picture in detail"]  # two lengths: batches are left-padded
    for i in range(4):
        make_image(i, (64, 48)).save(folder / "images" / f"{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "instruction": asks[i % 2], "answer": TARGET}))
    data = folder / "set.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data


def test_collate_left_pads_and_labels_only_the_answer(sharp_llava: Path, instructions: Path) -> None:
    model, processor = load_llava(str(sharp_llava), torch.device("cpu"))
    t = M2ptTrainer(
        M2ptTrainConfig(str(sharp_llava), str(instructions), "unused", device="cpu"),
        model,
        processor,
        log=io.StringIO(),
    )
    short = t.encoded[0]
    longer = type(short)(
        torch.cat([short.prompt_ids[:1], short.prompt_ids]), short.answer_ids, short.pixel_values
    )
    ids, mask, labels, px = collate([short, longer], pad_id=processor.tokenizer.pad_token_id)
    assert ids.shape == labels.shape == mask.shape and px.shape[0] == 2
    assert mask[0, 0] == 0 and mask[0, 1:].all() and mask[1].all()  # left padding
    answer = short.answer_ids.tolist()
    assert answer[-1] == processor.tokenizer.eos_token_id
    for row in labels:
        kept = row[row != -100].tolist()
        assert kept == answer and row[-len(answer) :].tolist() == answer


def test_prompts_learn_the_answer_backbone_frozen(
    sharp_llava: Path, instructions: Path, tmp_path: Path
) -> None:
    config = M2ptTrainConfig(
        str(sharp_llava), str(instructions), str(tmp_path / "m.safetensors"), n_vision=4, n_text=4,
        lr=0.05, steps=50, batch_size=4, seed=0, device="cpu",
    )  # fmt: skip
    model, processor = load_llava(config.backbone, torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not any(p.requires_grad for p in model.parameters())
    log = io.StringIO()
    trainer = M2ptTrainer(config, model, processor, log=log)
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == {
        id(p) for p in trainer.learner.parameters()
    }
    result = trainer.run()

    assert result.loss_end < 0.5 * result.loss_start, (result.loss_start, result.loss_end)
    tok = processor.tokenizer
    target = tok(TARGET, add_special_tokens=False)["input_ids"]

    def first(answer: str) -> list[int]:
        return tok(answer, add_special_tokens=False)["input_ids"][:1] if answer else []

    assert all(first(a) == target[:1] for a in result.answers_after), result.answers_after
    assert not all(first(a) == target[:1] for a in result.answers_before), result.answers_before
    assert all(a == TARGET for a in result.answers_after), result.answers_after
    assert "loss before" in log.getvalue() and "loss after" in log.getvalue()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the backbone is bit-identical

    adapter = load_adapter(result.adapter, max_bytes=1 << 22)
    assert adapter.manifest.method == "m2pt"
    assert adapter.manifest.backbone == with_weights(llava_fingerprint(model.config), model)  # weights too
    hp = adapter.manifest.hyperparameters
    assert hp["steps"] == 50 and hp["n_examples"] == 4 and hp["seed"] == 0 and hp["lr"] == 0.05
    assert hp["loss_end"] < hp["loss_start"]
    assert (hp["n_vision"], hp["n_text"]) == (4, 4)


def test_same_seed_same_adapter(sharp_llava: Path, instructions: Path, tmp_path: Path) -> None:
    shas = []
    for i in range(2):
        config = M2ptTrainConfig(
            str(sharp_llava), str(instructions), str(tmp_path / f"{i}.safetensors"), steps=3, device="cpu"
        )
        result = train_m2pt(config, log=io.StringIO())
        shas.append(load_adapter(result.adapter, max_bytes=1 << 22).manifest.tensors_sha256)
        assert Path(config.output).read_bytes() == result.adapter
    assert shas[0] == shas[1]


def test_bad_jsonl_is_rejected(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"image": "missing.png", "instruction": "x", "answer": "y"}\n')
    with pytest.raises(AdapterValueError, match="not found"):
        read_examples(data)
    data.write_text('{"image": "a.png"}\n')
    with pytest.raises(AdapterValueError, match="needs string fields"):
        read_examples(data)


@pytest.mark.slow  # a real process training: about 45 s
def test_cli_train_m2pt(sharp_llava: Path, instructions: Path, tmp_path: Path) -> None:
    out = tmp_path / "Cat-Answers.safetensors"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "adapters.cli", "train", "m2pt", "--backbone", str(sharp_llava),
        "--data", str(instructions), "-o", str(out), "--steps", "3", "--n-vision", "2", "--n-text", "3",
        "--device", "cpu",
    ]  # fmt: skip
    done = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "answer loss" in done.stdout and f"wrote {out}" in done.stdout
    adapter = load_adapter(out.read_bytes(), max_bytes=1 << 22)
    assert adapter.manifest.method == "m2pt"
    assert adapter.manifest.name == "cat-answers"
    assert (adapter.manifest.hyperparameters["n_vision"], adapter.manifest.hyperparameters["n_text"]) == (
        2,
        3,
    )
    assert adapter.manifest.hyperparameters["steps"] == 3


def test_interrupt_then_resume_equals_uninterrupted(
    sharp_llava: Path, instructions: Path, tmp_path: Path
) -> None:
    def config(folder: str, **kw: object) -> M2ptTrainConfig:
        # 4 examples, batch 3: 2 steps per epoch (3 + 1), so step 3 is mid-epoch.
        return M2ptTrainConfig(
            str(sharp_llava), str(instructions), str(tmp_path / folder / "m.safetensors"), steps=5,
            batch_size=3, lr=0.05, device="cpu", max_new_tokens=2, **kw,  # type: ignore[arg-type]
        )  # fmt: skip

    model, processor = load_llava(str(sharp_llava), torch.device("cpu"))
    whole = M2ptTrainer(config("whole"), model, processor, log=io.StringIO()).run()

    def ctrl_c_at_3(step: int) -> None:
        if step == 3:
            raise KeyboardInterrupt

    cut = config("cut")
    with pytest.raises(KeyboardInterrupt):
        M2ptTrainer(cut, model, processor, log=io.StringIO(), on_step=ctrl_c_at_3).run()
    tensors, meta = load_checkpoint(cut.checkpoint_path())
    assert meta["step"] == 3 and "optimizer.state.0.exp_avg" in tensors
    assert meta["history"] == whole.history[:3]

    cut.resume = True
    log = io.StringIO()
    resumed = M2ptTrainer(cut, model, processor, log=log).run()
    assert "resumed from" in log.getvalue() and "at step 3/5" in log.getvalue()
    assert resumed.steps == whole.steps == 5
    sha = [load_adapter(r.adapter, max_bytes=1 << 22).manifest.tensors_sha256 for r in (whole, resumed)]
    assert sha[0] == sha[1]  # bit-identical prompts and interaction layer
    assert resumed.history == whole.history and resumed.loss_start == whole.loss_start
    assert resumed.answers_before == whole.answers_before

    changed = config("cut", resume=True, n_text=3)
    with pytest.raises(AdapterValueError, match="n_text differ"):
        M2ptTrainer(changed, model, processor, log=io.StringIO()).run()


async def test_cli_train_m2pt_uploads_and_shows_each_answer_once(
    sharp_llava: Path,
    instructions: Path,
    make_settings,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "answers.safetensors"
    argv = [
        "train", "m2pt", "--backbone", str(sharp_llava), "--data", str(instructions), "-o", str(out),
        "--steps", "2", "--n-vision", "2", "--n-text", "2", "--max-new-tokens", "2", "--device", "cpu",
        "--upload", "http://test",
    ]  # fmt: skip
    settings = make_settings(clip_model="", llava_model=str(sharp_llava), admin_token=TOKEN)
    async with running_app(settings) as (client, app):
        monkeypatch.setattr(
            upload_module, "new_client", lambda: AsyncClient(transport=ASGITransport(app=app))
        )
        monkeypatch.setenv("PROMPTSWAP_ADMIN_TOKEN", TOKEN)
        assert await asyncio.to_thread(adapters_main, argv) == 0
        printed = capsys.readouterr()
        assert "uploaded as answers@1" in printed.out and TOKEN not in printed.out + printed.err
        listing = (await client.get("/v1/adapters")).json()["adapters"]
        assert [a["name"] for a in listing] == ["answers"]
    lines = (printed.out + printed.err).splitlines()
    for i in range(3):  # the three answers shown: "after" once each, in the summary
        assert len([line for line in lines if f"[{i}]" in line and "after" in line]) == 1, lines
    assert (tmp_path / "answers.safetensors.ckpt" / "last.safetensors").is_file()

    # --resume with the run already complete: no step left, the same adapter again.
    first = out.read_bytes()
    argv = [*argv[:-2], "--resume"]
    assert await asyncio.to_thread(adapters_main, argv) == 0
    assert "resumed from" in capsys.readouterr().err
    assert load_adapter(out.read_bytes(), max_bytes=1 << 22).manifest.tensors_sha256 == (
        load_adapter(first, max_bytes=1 << 22).manifest.tensors_sha256
    )
