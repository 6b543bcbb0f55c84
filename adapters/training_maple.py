"""Few-shot MaPLe training on a frozen CLIP, through the same prompted forward that serves.

Per step, the loss is cross-entropy over ``logit_scale * cos(image, text)`` against every
class prompt, with the image and text features from ``adapters.prompted_clip`` and the
learner's ``prompts()`` (text prompts expanded over the classes, vision prompts over the
batch), exactly what the service computes with the folded adapter. The split comes from
the seed (``adapters.data``); the loop, checkpoints and resume are ``adapters.training``'s.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from transformers import CLIPModel

from adapters.checkpoint import write_atomic
from adapters.data import PixelCache, Split, few_shot_split
from adapters.devices import resolve_device
from adapters.errors import AdapterValueError
from adapters.format import dump
from adapters.maple import MapleConfig, MaplePromptLearner, clip_fingerprint, fold
from adapters.options import option
from adapters.prompted_clip import encode_image, encode_text
from adapters.training import RunConfig, TrainingRun, load_frozen, resolve_amp
from adapters.weights import with_weights

EVAL_BATCH = 256
MAX_LABELS_JSON = 16 * 1024  # the manifest header is bounded (adapters.container)


@dataclass
class TrainConfig(RunConfig):
    backbone: str = option("CLIP hub id or local directory (the one you serve)")
    data: str = option("image folder: one sub-folder per class, folder name = label")
    shots: int = option("training images per class; the rest are held out", 16)
    epochs: int = option("passes over the few-shot set", 50)
    max_steps: int | None = option("stop after this many optimizer steps", None, shown="epochs' worth")
    n_ctx: int = option("prompt tokens per layer", 2)
    depth: int = option("layers that get prompts (J)", 9)
    template: str = option("prompt; serve with the same one", "a photo of a {}.")
    eval_fraction: float = option("share of the non-training images held out", 1.0)
    eval_every: int = option("epochs between held-out evaluations (the last epoch always)", 1)
    amp: str = option("mixed precision (CUDA only)", "auto", choices=("auto", "bf16", "fp16", "off"))


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


def load_backbone(ident: str, device: torch.device) -> tuple[CLIPModel, Any]:
    """The frozen CLIP in fp32 (autocast supplies the low precision) and its processor."""
    return load_frozen(CLIPModel, ident, device)


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


# ---------------------------------------------------------------- the trainer


class Trainer(TrainingRun[TrainConfig, TrainResult]):
    def __init__(
        self,
        config: TrainConfig,
        model: CLIPModel,
        processor: Any,
        *,
        log: TextIO | None = None,  # default: sys.stderr at call time
        on_step: Callable[[int], None] | None = None,  # called after each step (tests interrupt here)
    ) -> None:
        device = next(model.parameters()).device
        self.split: Split = few_shot_split(
            config.data, shots=config.shots, seed=config.seed, eval_fraction=config.eval_fraction
        )
        if not self.split.held_out:
            raise AdapterValueError("no held-out images: lower --shots or raise --eval-fraction")
        self.pixels = PixelCache(
            lambda image: processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        )
        ids, mask = tokenize_prompts(processor.tokenizer, config.template, self.split.classes, config.n_ctx)
        self.ids, self.mask = ids.to(device), mask.to(device)

        torch.manual_seed(config.seed)  # the learner's random init
        maple = MapleConfig.for_clip(model.config, n_ctx=config.n_ctx, depth=config.depth)
        learner = MaplePromptLearner(maple, ctx_from_template(model, self.ids, config.n_ctx))
        steps_per_epoch = math.ceil(len(self.split.train) / max(1, config.batch_size))
        total = config.epochs * steps_per_epoch
        super().__init__(
            config, model, learner, n_examples=len(self.split.train),
            total_steps=min(total, config.max_steps) if config.max_steps else total, cosine=True,
            amp=resolve_amp(config.amp, device), log=log, on_step=on_step,
        )  # fmt: skip
        self.model: CLIPModel = model
        self.learner: MaplePromptLearner = learner
        self.zero_shot: tuple[float, list[int]] | None = None

    def run_facts(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "backbone": clip_fingerprint(self.model.config), "data": self.split.fingerprint(),
            "classes": self.split.classes, "held_out": len(self.split.held_out), "shots": c.shots,
            "n_ctx": c.n_ctx, "depth": c.depth, "lr": c.lr, "weight_decay": c.weight_decay,
            "batch_size": c.batch_size, "seed": c.seed, "template": c.template,
            "total_steps": self.total_steps, "amp": str(self.amp),
        }  # fmt: skip

    def state(self) -> dict[str, Any]:
        assert self.zero_shot is not None
        return {"zero_shot": {"accuracy": self.zero_shot[0], "predictions": self.zero_shot[1]}}

    def load_state(self, state: dict[str, Any]) -> None:
        self.zero_shot = (state["zero_shot"]["accuracy"], list(state["zero_shot"]["predictions"]))

    def before(self) -> None:
        self.zero_shot = self.evaluate(prompted=False)

    def intro(self) -> str:
        assert self.zero_shot is not None
        return (
            f"{len(self.split.classes)} classes, {len(self.split.train)} training images, "
            f"{len(self.split.held_out)} held out; zero-shot held-out accuracy {self.zero_shot[0]:.1%}"
        )

    def batch_loss(self, indices: list[int]) -> tuple[torch.Tensor, str]:
        pixels, labels = self.pixels.batch([self.split.train[i] for i in indices])
        pixels, labels = pixels.to(self.device), labels.to(self.device)
        logits = class_logits(self.model, pixels, self.ids, self.mask, self.learner.prompts())
        loss = F.cross_entropy(logits.float(), labels)
        acc = (logits.argmax(-1) == labels).float().mean().item()
        return loss, f"  acc {acc:6.1%}"

    def status(self) -> str:
        return f"  held-out {self.history[-1]['held_out_accuracy']:6.1%}" if self.history else ""

    def end_epoch(self, epoch: int, check: Callable[[], None]) -> None:
        if self.step == self.total_steps or (epoch + 1) % max(1, self.cfg.eval_every) == 0:
            accuracy, _ = self.evaluate(prompted=True, check=check)
            self.history.append({"epoch": epoch + 1, "step": self.step, "held_out_accuracy": accuracy})

    @torch.no_grad()
    def evaluate(self, prompted: bool, check: Callable[[], None] = lambda: None) -> tuple[float, list[int]]:
        """Accuracy and top-1 predictions on the held-out split (zero-shot when not prompted)."""
        items = self.split.held_out
        preds: list[int] = []
        with self.autocast():
            prompts = self.learner.prompts() if prompted else None
            text = normalized_text(self.model, self.ids, self.mask, None if prompts is None else prompts[0])
            for start in range(0, len(items), EVAL_BATCH):
                check()
                pixels, _ = self.pixels.batch(items[start : start + EVAL_BATCH])
                logits = class_logits(self.model, pixels.to(self.device), self.ids, self.mask, prompts, text)
                preds += logits.argmax(-1).tolist()
        correct = sum(int(p == label) for p, (_, label) in zip(preds, items, strict=True))
        return correct / len(items), preds

    def result(self, seconds: float) -> TrainResult:
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
            fold(self.learner), name=c.adapter_name(),
            backbone=with_weights(clip_fingerprint(self.model.config), self.model),
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
