"""Few-shot MaPLe training on a frozen CLIP, through the same prompted forward that serves.

Only the prompt learner trains: every backbone weight has ``requires_grad`` False and is
never handed to the optimizer. Per step, the loss is cross-entropy over
``logit_scale * cos(image, text)`` against every class prompt, with the image and text
features from ``adapters.prompted_clip`` and the learner's ``prompts()`` (text prompts
expanded over the classes, vision prompts over the batch), exactly what the service
computes with the folded adapter.

The whole run is a function of the config: the split and each epoch's order come from
the seed (``adapters.data``), so a run resumed from a checkpoint at step k ends with the
same prompts as a run that never stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from transformers import AutoProcessor, CLIPModel

from adapters.checkpoint import (
    flatten_optimizer,
    load_checkpoint,
    save_checkpoint,
    unflatten_optimizer,
    write_atomic,
)
from adapters.data import PixelCache, Split, epoch_order, few_shot_split
from adapters.errors import AdapterValueError
from adapters.format import dump
from adapters.maple import MapleConfig, MaplePromptLearner, clip_fingerprint, fold
from adapters.prompted_clip import encode_image, encode_text

CHECKPOINT_NAME = "last.safetensors"
CHECKPOINT_FORMAT = 1
EVAL_BATCH = 256
MAX_LABELS_JSON = 16 * 1024  # the manifest header is bounded (adapters.format)


@dataclass
class TrainConfig:
    backbone: str  # hub id or local directory
    data: str  # image folder: one sub-folder per class
    output: str
    name: str | None = None  # adapter name; default: the output file's stem
    shots: int = 16
    epochs: int = 50
    max_steps: int | None = None
    n_ctx: int = 2
    depth: int = 9
    lr: float = 0.01
    weight_decay: float = 0.01
    batch_size: int = 32
    seed: int = 0
    template: str = "a photo of a {}."
    eval_fraction: float = 1.0
    eval_every: int = 1  # epochs between held-out evaluations (the last epoch always)
    device: str = "auto"
    amp: str = "auto"  # auto (bf16, else fp16, on CUDA; off on CPU), bf16, fp16, off
    checkpoint_dir: str | None = None  # default: OUTPUT.ckpt
    resume: bool = False
    description: str = ""

    def adapter_name(self) -> str:
        return self.name or Path(self.output).stem.lower()

    def checkpoint_path(self) -> Path:
        directory = self.checkpoint_dir or f"{self.output}.ckpt"
        return Path(directory) / CHECKPOINT_NAME


@dataclass
class TrainResult:
    adapter: bytes
    classes: list[str]
    held_out: list[tuple[Path, int]]
    zero_shot_accuracy: float
    accuracy: float  # the trained adapter on the held-out split
    predictions: list[int]  # the adapter's top-1 class per held-out image
    zero_shot_predictions: list[int]
    steps: int
    seconds: float  # training time of this process (a resumed run counts its own part)
    history: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------- pieces


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise AdapterValueError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(device)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA only: CPU autocast would be slower and change the numbers."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def load_backbone(ident: str, device: torch.device) -> tuple[CLIPModel, Any]:
    """The frozen CLIP in fp32 (autocast supplies the low precision) and its processor."""
    model = CLIPModel.from_pretrained(ident, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(ident)
    # transformers wraps .to with functools.wraps, so type checkers lose its self
    return torch.nn.Module.to(model, device), processor


def freeze(model: CLIPModel) -> None:
    model.requires_grad_(False)
    model.eval()  # no dropout: the forward is deterministic, as serving is


def tokenize_prompts(
    tokenizer: Any, template: str, classes: list[str], n_ctx: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask of every class prompt, padded together as the service pads them."""
    if template.count("{}") != 1:
        raise AdapterValueError(f"the template must contain '{{}}' once, got {template!r}")
    prefix = template.split("{}")[0].strip()
    before = len(tokenizer([prefix])["input_ids"][0]) - 2  # minus start and end tokens
    if before < n_ctx:
        raise AdapterValueError(
            f"template {template!r} has {before} tokens before the label; n_ctx {n_ctx} needs at least that many"
        )
    tok = tokenizer([template.replace("{}", c) for c in classes], padding=True, return_tensors="pt")
    return tok["input_ids"], tok["attention_mask"]


def ctx_from_template(model: CLIPModel, input_ids: torch.Tensor, n_ctx: int) -> torch.Tensor:
    """Embeddings of the n_ctx template words after the start token (MaPLe's CTX_INIT)."""
    with torch.no_grad():
        return model.text_model.embeddings.token_embedding(input_ids[0, 1 : 1 + n_ctx]).float().cpu()


def class_logits(
    model: CLIPModel,
    pixels: torch.Tensor,  # (B, 3, H, W)
    input_ids: torch.Tensor,  # (C, L)
    mask: torch.Tensor,  # (C, L)
    prompts: tuple[torch.Tensor, torch.Tensor] | None,  # text (depth, n_ctx, Dt), vision (depth, n_ctx, Dv)
    text_features: torch.Tensor | None = None,  # (C, P) normalised, when already known
) -> torch.Tensor:
    """(B, C) ``logit_scale * cos(image, class prompt)``, as the service computes it."""
    text, vision = prompts if prompts is not None else (None, None)
    if text_features is None:
        text_features = normalized_text(model, input_ids, mask, text)
    image = encode_image(
        model, pixels, None if vision is None else vision.unsqueeze(0).expand(len(pixels), -1, -1, -1)
    )
    image = F.normalize(image.float(), dim=-1)
    return model.logit_scale.exp().float() * image @ text_features.T


def normalized_text(
    model: CLIPModel, input_ids: torch.Tensor, mask: torch.Tensor, text: torch.Tensor | None
) -> torch.Tensor:
    expanded = None if text is None else text.unsqueeze(0).expand(len(input_ids), -1, -1, -1)
    return F.normalize(encode_text(model, input_ids, mask, expanded).float(), dim=-1)  # (C, P)


class Progress:
    """One status line on stderr: rewritten in place on a terminal, every ~5% otherwise."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total, self.stream = total, stream
        self.tty = stream.isatty()
        self.every = max(1, total // 20)
        self.started = time.monotonic()

    def update(self, step: int, loss: float, acc: float, held_out: float | None) -> None:
        if not self.tty and step % self.every and step != self.total:
            return
        rate = step / max(time.monotonic() - self.started, 1e-9)
        tail = "" if held_out is None else f"  held-out {held_out:6.1%}"
        line = f"step {step:>6}/{self.total}  loss {loss:.4f}  acc {acc:6.1%}{tail}  ({rate:.1f} it/s)"
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


class _DeferredSigint:
    """Ctrl-C takes effect between steps, so the checkpoint it triggers is consistent.
    A second Ctrl-C interrupts at once. Only the main thread can own signal handlers."""

    def __init__(self) -> None:
        self.pending = False
        self._old: Any = None

    def __enter__(self) -> _DeferredSigint:  # noqa: PYI034
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.pending:
            raise KeyboardInterrupt
        self.pending = True

    def check(self) -> None:
        if self.pending:
            raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


# ---------------------------------------------------------------- the trainer


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        model: CLIPModel,
        processor: Any,
        *,
        log: TextIO | None = None,  # default: sys.stderr at call time
        on_step: Callable[[int], None] | None = None,  # called after each step (tests interrupt here)
    ) -> None:
        self.cfg = config
        self.model = model
        self.log = log or sys.stderr
        self.on_step = on_step
        self.device = next(model.parameters()).device
        self.amp = resolve_amp(config.amp, self.device)
        freeze(model)

        self.split: Split = few_shot_split(
            config.data, shots=config.shots, seed=config.seed, eval_fraction=config.eval_fraction
        )
        if not self.split.held_out:
            raise AdapterValueError("no held-out images: lower --shots or raise --eval-fraction")
        self.pixels = PixelCache(
            lambda image: processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        )
        ids, mask = tokenize_prompts(processor.tokenizer, config.template, self.split.classes, config.n_ctx)
        self.ids, self.mask = ids.to(self.device), mask.to(self.device)

        torch.manual_seed(config.seed)  # the learner's random init
        maple = MapleConfig.for_clip(model.config, n_ctx=config.n_ctx, depth=config.depth)
        self.learner = MaplePromptLearner(maple, ctx_from_template(model, self.ids, config.n_ctx)).to(
            self.device
        )
        self.optimizer = torch.optim.AdamW(
            self.learner.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.steps_per_epoch = math.ceil(len(self.split.train) / config.batch_size)
        total = config.epochs * self.steps_per_epoch
        self.total_steps = min(total, config.max_steps) if config.max_steps else total
        if self.total_steps < 1:
            raise AdapterValueError("nothing to train: epochs and max steps must be >= 1")
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=self.total_steps)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp is torch.float16)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.zero_shot: tuple[float, list[int]] | None = None

    # ------------------------------------------------------------ facts that must not change on resume

    def run_facts(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "backbone": clip_fingerprint(self.model.config), "data": self.split.fingerprint(),
            "classes": self.split.classes, "held_out": len(self.split.held_out), "shots": c.shots,
            "n_ctx": c.n_ctx, "depth": c.depth, "lr": c.lr, "weight_decay": c.weight_decay,
            "batch_size": c.batch_size, "seed": c.seed, "template": c.template,
            "total_steps": self.total_steps, "amp": str(self.amp),
        }  # fmt: skip

    # ------------------------------------------------------------ training

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def train_step(self, items: list[tuple[Path, int]]) -> tuple[float, float]:
        pixels, labels = self.pixels.batch(items)
        pixels, labels = pixels.to(self.device), labels.to(self.device)
        with self._autocast():
            logits = class_logits(self.model, pixels, self.ids, self.mask, self.learner.prompts())
            loss = F.cross_entropy(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.item(), (logits.argmax(-1) == labels).float().mean().item()

    @torch.no_grad()
    def evaluate(self, prompted: bool, check: Callable[[], None] = lambda: None) -> tuple[float, list[int]]:
        """Accuracy and top-1 predictions on the held-out split (zero-shot when not prompted)."""
        items = self.split.held_out
        preds: list[int] = []
        with self._autocast():
            prompts = self.learner.prompts() if prompted else None
            text = normalized_text(self.model, self.ids, self.mask, None if prompts is None else prompts[0])
            for start in range(0, len(items), EVAL_BATCH):
                check()
                pixels, _ = self.pixels.batch(items[start : start + EVAL_BATCH])
                logits = class_logits(self.model, pixels.to(self.device), self.ids, self.mask, prompts, text)
                preds += logits.argmax(-1).tolist()
        correct = sum(int(p == label) for p, (_, label) in zip(preds, items, strict=False))
        return correct / len(items), preds

    def run(self) -> TrainResult:
        started = time.monotonic()
        path = self.cfg.checkpoint_path()
        if self.cfg.resume and path.exists():
            self.load(path)
            self.log.write(f"resumed from {path} at step {self.step}/{self.total_steps}\n")
        elif self.cfg.resume:
            self.log.write(f"no checkpoint at {path}: starting from step 0\n")
        if self.zero_shot is None:
            self.zero_shot = self.evaluate(prompted=False)
        self.log.write(
            f"{len(self.split.classes)} classes, {len(self.split.train)} training images, "
            f"{len(self.split.held_out)} held out; zero-shot held-out accuracy {self.zero_shot[0]:.1%}\n"
        )
        progress = Progress(self.total_steps, self.log)
        consistent = True  # False while a step is half-applied
        try:
            with _DeferredSigint() as sigint:
                while self.step < self.total_steps:
                    epoch, pos = divmod(self.step, self.steps_per_epoch)
                    order = epoch_order(len(self.split.train), seed=self.cfg.seed, epoch=epoch)
                    batch = order[pos * self.cfg.batch_size : (pos + 1) * self.cfg.batch_size]
                    consistent = False
                    loss, acc = self.train_step([self.split.train[i] for i in batch])
                    self.step += 1
                    consistent = True
                    if self.step % self.steps_per_epoch == 0 or self.step == self.total_steps:
                        self._end_epoch(epoch, sigint.check)
                    held = self.history[-1]["held_out_accuracy"] if self.history else None
                    progress.update(self.step, loss, acc, held)
                    if self.on_step is not None:
                        self.on_step(self.step)
                    sigint.check()
        except KeyboardInterrupt:
            progress.close()
            if consistent:
                self.save(path)
                self.log.write(
                    f"interrupted at step {self.step}: checkpoint {path}; continue with --resume\n"
                )
            raise
        progress.close()
        return self._result(time.monotonic() - started)

    def _end_epoch(self, epoch: int, check: Callable[[], None]) -> None:
        last = self.step == self.total_steps
        if last or (epoch + 1) % max(1, self.cfg.eval_every) == 0:
            self._record(epoch + 1, check)
        self.save(self.cfg.checkpoint_path())

    def _record(self, epoch: int, check: Callable[[], None] = lambda: None) -> None:
        accuracy, _ = self.evaluate(prompted=True, check=check)
        self.history.append({"epoch": epoch, "step": self.step, "held_out_accuracy": accuracy})

    # ------------------------------------------------------------ checkpoints

    def save(self, path: Path) -> None:
        opt_tensors, opt_rest = flatten_optimizer(self.optimizer.state_dict())
        tensors = {f"learner.{k}": v for k, v in self.learner.state_dict().items()}
        tensors.update(opt_tensors)
        tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        assert self.zero_shot is not None
        meta = {
            "format": CHECKPOINT_FORMAT, "step": self.step, "facts": self.run_facts(),
            "optimizer": opt_rest, "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "history": self.history,
            "zero_shot": {"accuracy": self.zero_shot[0], "predictions": self.zero_shot[1]},
        }  # fmt: skip
        save_checkpoint(path, tensors, meta)

    def load(self, path: Path) -> None:
        tensors, meta = load_checkpoint(path)
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise AdapterValueError(
                f"checkpoint {path} has format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT}"
            )
        facts = json.loads(json.dumps(self.run_facts()))  # as JSON would give them back
        changed = sorted(k for k in facts if meta["facts"].get(k) != facts[k])
        if changed:
            raise AdapterValueError(f"checkpoint {path} is from a different run: {', '.join(changed)} differ")
        learner = {k[len("learner.") :]: v for k, v in tensors.items() if k.startswith("learner.")}
        self.learner.load_state_dict(learner, strict=True)
        self.optimizer.load_state_dict(unflatten_optimizer(tensors, meta["optimizer"]))
        self.scheduler.load_state_dict(meta["scheduler"])
        if meta["scaler"]:
            self.scaler.load_state_dict(meta["scaler"])
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        self.step = int(meta["step"])
        self.history = list(meta["history"])
        self.zero_shot = (meta["zero_shot"]["accuracy"], list(meta["zero_shot"]["predictions"]))

    # ------------------------------------------------------------ the adapter

    def _result(self, seconds: float) -> TrainResult:
        assert self.zero_shot is not None
        accuracy, predictions = self.evaluate(prompted=True)
        c = self.cfg
        hp: dict[str, Any] = {
            "template": c.template, "shots": c.shots, "steps": self.step, "epochs": c.epochs, "seed": c.seed,
            "lr": c.lr, "batch_size": c.batch_size, "train_images": len(self.split.train),
            "held_out_images": len(self.split.held_out), "held_out_accuracy": round(accuracy, 6),
            "zero_shot_accuracy": round(self.zero_shot[0], 6),
        }  # fmt: skip
        labels = json.dumps(self.split.classes)
        if len(labels) <= MAX_LABELS_JSON:
            hp["labels"] = labels  # a JSON list as a string: manifest values are scalars
        data = dump(
            fold(self.learner), name=c.adapter_name(), backbone=clip_fingerprint(self.model.config),
            description=c.description, hyperparameters=hp,
        )  # fmt: skip
        return TrainResult(
            adapter=data, classes=self.split.classes, held_out=self.split.held_out,
            zero_shot_accuracy=self.zero_shot[0], accuracy=accuracy, predictions=predictions,
            zero_shot_predictions=self.zero_shot[1], steps=self.step, seconds=seconds, history=self.history,
        )  # fmt: skip


def train_maple(config: TrainConfig, *, log: TextIO | None = None) -> TrainResult:
    """Load the backbone, train, and write the adapter file (atomically) to ``config.output``."""
    model, processor = load_backbone(config.backbone, resolve_device(config.device))
    result = Trainer(config, model, processor, log=log).run()
    write_atomic(Path(config.output), result.adapter)
    return result
