"""The training loop every adapter method shares, on a frozen backbone.

Only the prompt learner trains: every backbone weight has ``requires_grad`` False and is
never handed to the optimizer (AdamW over the learner's parameters). A run is a function
of its config: the learner's init comes from the seed and each epoch's order from
``(seed, epoch)`` (``adapters.data.epoch_order``), so a run resumed at step k ends with
the same adapter as a run that never stopped. A checkpoint (``adapters.checkpoint``:
learner, optimizer, schedule, grad scaler, RNG, the run's history) is written at every
epoch's end and on Ctrl-C, which takes effect between steps; a resume whose settings
would change the result is refused, naming them.

A method supplies its parts by subclassing ``TrainingRun`` (``adapters.training_maple``,
``adapters.training_m2pt``): the learner, the loss of a batch, what it measures before
training and at an epoch's end, the facts a resume must match, and its result.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TextIO, TypeVar

import torch
from torch import nn
from transformers import AutoProcessor, PreTrainedModel

from adapters.checkpoint import flatten_optimizer, load_checkpoint, save_checkpoint, unflatten_optimizer
from adapters.data import epoch_order
from adapters.errors import AdapterValueError
from adapters.options import option

CHECKPOINT_NAME = "last.safetensors"
CHECKPOINT_FORMAT = 2  # 2: the method's own state under "method" (shared loop)

M = TypeVar("M", bound=PreTrainedModel)
R = TypeVar("R")


@dataclass
class RunConfig:
    """What every training run takes; a method's config adds its own fields (and help texts)."""

    backbone: str = option("hub id or local directory of the backbone (the one you serve)")
    data: str = option("the training data")
    output: str = option("adapter file to write", flags=("-o",))
    name: str | None = option("adapter name", None, shown="the output file's stem, lower-cased")
    lr: float = option("AdamW learning rate", 0.01)
    weight_decay: float = option("AdamW weight decay", 0.01)
    batch_size: int = option("examples per optimizer step", 32)
    seed: int = option("seed of the prompts' random init and of the data order", 0)
    device: str = option("where to train", "auto", choices=("auto", "cpu", "cuda"))
    checkpoint_dir: str | None = option("where checkpoints go", None, shown="OUTPUT.ckpt")
    resume: bool = option("continue from the last checkpoint of the same command", False)
    description: str = option("free text stored in the manifest", "")

    def adapter_name(self) -> str:
        return self.name or Path(self.output).stem.lower()

    def checkpoint_path(self) -> Path:
        directory = self.checkpoint_dir or f"{self.output}.ckpt"
        return Path(directory) / CHECKPOINT_NAME


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA only: CPU autocast would be slower and change the numbers."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def load_frozen(model_class: type[M], ident: str, device: torch.device) -> tuple[M, Any]:
    """The backbone in fp32 (autocast supplies any low precision), frozen, in eval mode, and its processor."""
    model = model_class.from_pretrained(ident, dtype=torch.float32)
    freeze(model)
    # transformers wraps .to with functools.wraps, so type checkers lose its self
    return nn.Module.to(model, device), AutoProcessor.from_pretrained(ident)


def freeze(model: nn.Module) -> None:
    model.requires_grad_(False)
    model.eval()  # no dropout: the forward is deterministic, as serving is


class Progress:
    """One status line on stderr: rewritten in place on a terminal, every ~5% otherwise."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total, self.stream = total, stream
        self.tty = stream.isatty()
        self.every = max(1, total // 20)
        self.started = time.monotonic()

    def update(self, step: int, loss: float, extra: str = "") -> None:
        if not self.tty and step % self.every and step != self.total:
            return
        rate = step / max(time.monotonic() - self.started, 1e-9)
        line = f"step {step:>6}/{self.total}  loss {loss:.4f}{extra}  ({rate:.1f} it/s)"
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


C = TypeVar("C", bound="RunConfig")


class TrainingRun(ABC, Generic[C, R]):
    """The shared loop; a subclass builds its learner and data, then calls ``__init__``."""

    def __init__(
        self,
        config: C,
        model: nn.Module,
        learner: nn.Module,
        *,
        n_examples: int,  # what one epoch goes through
        total_steps: int,
        cosine: bool,  # cosine learning-rate schedule over the run, else a constant rate
        amp: torch.dtype | None,
        log: TextIO | None,  # default: sys.stderr at call time
        on_step: Callable[[int], None] | None,  # called after each step (tests interrupt here)
    ) -> None:
        if config.batch_size < 1:
            raise AdapterValueError(f"batch size must be >= 1, got {config.batch_size}")
        if total_steps < 1:
            raise AdapterValueError("nothing to train: epochs, steps and max steps must be >= 1")
        self.cfg, self.model = config, model
        self.log = sys.stderr if log is None else log
        self.on_step = on_step
        self.device = next(model.parameters()).device
        self.amp = amp
        freeze(model)
        self.learner = learner.to(self.device)
        self.n_examples = n_examples
        self.steps_per_epoch = math.ceil(n_examples / config.batch_size)
        self.total_steps = total_steps
        self.optimizer = torch.optim.AdamW(
            self.learner.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.scheduler = (
            torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=total_steps) if cosine else None
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp is torch.float16)
        self.step = 0
        self.history: list[Any] = []  # the method's record of the run, kept across a resume

    # ------------------------------------------------------------ a method's parts

    @abstractmethod
    def batch_loss(self, indices: list[int]) -> tuple[torch.Tensor, str]:
        """The loss of these examples (differentiable) and what the progress line shows beside it."""

    @abstractmethod
    def before(self) -> None:
        """Measure the untrained state (a resumed run restores it with ``load_state``)."""

    @abstractmethod
    def intro(self) -> str:
        """The line(s) logged before the first step."""

    @abstractmethod
    def run_facts(self) -> dict[str, Any]:
        """Everything that changes the result: a resume must find it unchanged."""

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """The method's own JSON-able state for a checkpoint (what ``before`` measured)."""

    @abstractmethod
    def load_state(self, state: dict[str, Any]) -> None: ...

    @abstractmethod
    def result(self, seconds: float) -> R: ...

    def end_epoch(self, epoch: int, check: Callable[[], None]) -> None:
        """After the last step of ``epoch`` (0-based); ``check`` raises on a pending Ctrl-C."""

    def after_step(self, loss: float) -> None: ...

    def status(self) -> str:
        """What the progress line shows after the loss and the batch's own numbers."""
        return ""

    # ------------------------------------------------------------ the loop

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def train_step(self, indices: list[int]) -> tuple[float, str]:
        with self.autocast():
            loss, shown = self.batch_loss(indices)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        return loss.item(), shown

    def run(self) -> R:
        started = time.monotonic()
        path = self.cfg.checkpoint_path()
        if self.cfg.resume and path.exists():
            self.load(path)
            self.log.write(f"resumed from {path} at step {self.step}/{self.total_steps}\n")
        else:
            if self.cfg.resume:
                self.log.write(f"no checkpoint at {path}: starting from step 0\n")
            self.before()
        self.log.write(self.intro() + "\n")
        progress = Progress(self.total_steps, self.log)
        consistent = True  # False while a step is half-applied
        try:
            with _DeferredSigint() as sigint:
                while self.step < self.total_steps:
                    epoch, pos = divmod(self.step, self.steps_per_epoch)
                    order = epoch_order(self.n_examples, seed=self.cfg.seed, epoch=epoch)
                    batch = order[pos * self.cfg.batch_size : (pos + 1) * self.cfg.batch_size]
                    consistent = False
                    loss, shown = self.train_step(batch)
                    self.step += 1
                    self.after_step(loss)
                    consistent = True
                    if self.step % self.steps_per_epoch == 0 or self.step == self.total_steps:
                        self.end_epoch(epoch, sigint.check)
                        self.save(path)
                    progress.update(self.step, loss, shown + self.status())
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
        return self.result(time.monotonic() - started)

    # ------------------------------------------------------------ checkpoints

    def save(self, path: Path) -> None:
        opt_tensors, opt_rest = flatten_optimizer(self.optimizer.state_dict())
        tensors = {f"learner.{k}": v for k, v in self.learner.state_dict().items()}
        tensors.update(opt_tensors)
        tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        meta = {
            "format": CHECKPOINT_FORMAT, "step": self.step, "facts": self.run_facts(),
            "optimizer": opt_rest, "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "history": self.history, "method": self.state(),
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
        if self.scheduler is not None:
            self.scheduler.load_state_dict(meta["scheduler"])
        if meta["scaler"]:
            self.scaler.load_state_dict(meta["scaler"])
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        self.step = int(meta["step"])
        self.history = list(meta["history"])
        self.load_state(meta["method"])
