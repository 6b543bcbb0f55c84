"""M²PT instruction tuning on a frozen LLaVA, through the same explicit prompted forward.

The learner is the vision prompts, the text prompts and the interaction layer. Each
example is the processor's chat prompt (one image part + the instruction, with the
generation prompt) followed by the answer tokens and eos; the loss is cross-entropy on the
answer and eos positions only, from ``adapters.prompted_llava.explicit_forward`` fed with
``learner.as_folded()`` (differentiable). Batches are left-padded, as that forward expects.
The loop, checkpoints and resume are ``adapters.training``'s (constant learning rate).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import LlavaForConditionalGeneration

from adapters.checkpoint import write_atomic
from adapters.devices import resolve_device
from adapters.errors import AdapterValueError
from adapters.format import dump
from adapters.m2pt import M2ptConfig, M2ptPromptLearner, fold, llava_fingerprint
from adapters.options import option
from adapters.prompted_llava import explicit_forward
from adapters.training import RunConfig, TrainingRun, load_frozen
from adapters.weights import with_weights

IGNORE = -100
SHOW_EXAMPLES = 3  # greedy answers printed before and after


@dataclass
class M2ptTrainConfig(RunConfig):
    backbone: str = option("LLaVA directory or hub id (the one you serve)")
    data: str = option(
        'JSONL instruction set: {"image": path relative to the file, "instruction": ..., "answer": ...}'
    )
    weight_decay: float = option("AdamW weight decay", 0.0)
    batch_size: int = option("examples per optimizer step", 4)
    n_vision: int = option("visual prompts per vision layer", 4)
    n_text: int = option("textual prompts per LLM layer", 4)
    steps: int = option("optimizer steps", 60)
    max_new_tokens: int = option("longest greedy answer shown before and after", 12)


@dataclass
class Example:
    image: Path
    instruction: str
    answer: str


@dataclass
class M2ptTrainResult:
    adapter: bytes
    steps: int
    loss_start: float  # mean loss over the whole set, before the first step
    loss_end: float  # the same, after the last step
    answers_before: list[str]
    answers_after: list[str]
    examples: list[Example]
    seconds: float
    history: list[float] = field(default_factory=list)  # per-step batch loss


def read_examples(path: str | Path) -> list[Example]:
    """The JSONL instruction set; image paths resolve against the file's folder."""
    path = Path(path)
    base = path.parent
    out: list[Example] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise AdapterValueError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not all(
            isinstance(row.get(k), str) for k in ("image", "instruction", "answer")
        ):
            raise AdapterValueError(f"{path}:{n}: needs string fields 'image', 'instruction' and 'answer'")
        image = base / row["image"]
        if not image.is_file():
            raise AdapterValueError(f"{path}:{n}: image {image} not found")
        out.append(Example(image, row["instruction"], row["answer"]))
    if not out:
        raise AdapterValueError(f"{path}: no examples")
    return out


def load_llava(ident: str, device: torch.device) -> tuple[LlavaForConditionalGeneration, Any]:
    """The LLaVA in fp32, frozen and in eval mode, and its processor."""
    return load_frozen(LlavaForConditionalGeneration, ident, device)


def examples_fingerprint(examples: list[Example]) -> str:
    """Identifies the training set (image names and texts), so a resume on changed data is refused."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.image.name, e.instruction, e.answer]).encode() + b"\n")
    return h.hexdigest()[:16]


@dataclass
class Encoded:
    prompt_ids: torch.Tensor  # (P,) the chat prompt, image tokens expanded
    answer_ids: torch.Tensor  # (A,) the answer tokens then eos
    pixel_values: torch.Tensor  # (3, H, W)


def encode_example(processor: Any, example: Example) -> Encoded:
    tokenizer = processor.tokenizer
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": example.instruction}]}
    ]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    with Image.open(example.image) as im:
        image = im.convert("RGB")
    inputs = processor(images=image, text=text, return_tensors="pt")
    answer = tokenizer(example.answer, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is None:
        raise AdapterValueError("the backbone's tokenizer has no eos token")
    answer_ids = torch.tensor([*answer, tokenizer.eos_token_id], dtype=torch.long)
    return Encoded(inputs["input_ids"][0], answer_ids, inputs["pixel_values"][0])


def collate(items: list[Encoded], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Left-padded (ids, mask, labels, pixels); labels are IGNORE outside the answers."""
    seqs = [torch.cat([e.prompt_ids, e.answer_ids]) for e in items]
    length = max(len(s) for s in seqs)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE, dtype=torch.long)
    for i, (e, s) in enumerate(zip(items, seqs, strict=True)):
        ids[i, length - len(s) :] = s
        mask[i, length - len(s) :] = 1
        labels[i, length - len(e.answer_ids) :] = e.answer_ids
    return ids, mask, labels, torch.stack([e.pixel_values for e in items])


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, averaged over the labelled (answer + eos) tokens."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)


class M2ptTrainer(TrainingRun[M2ptTrainConfig, M2ptTrainResult]):
    def __init__(
        self,
        config: M2ptTrainConfig,
        model: LlavaForConditionalGeneration,
        processor: Any,
        *,
        log: TextIO | None = None,
        on_step: Callable[[int], None] | None = None,  # called after each step (tests interrupt here)
    ) -> None:
        self.processor = processor
        self.examples = read_examples(config.data)
        self.encoded = [encode_example(processor, e) for e in self.examples]
        tok = processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        m2pt = M2ptConfig.for_llava(model.config, n_vision=config.n_vision, n_text=config.n_text)
        torch.manual_seed(config.seed)  # the learner's random init
        learner = M2ptPromptLearner(m2pt)
        super().__init__(
            config, model, learner, n_examples=len(self.encoded), total_steps=config.steps, cosine=False,
            amp=None, log=log, on_step=on_step,
        )  # fmt: skip
        self.model: LlavaForConditionalGeneration = model
        self.learner: M2ptPromptLearner = learner
        self.loss_start = float("nan")
        self.answers_before: list[str] = []

    def _batch(self, items: list[Encoded]) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(self.device) for t in collate(items, self.pad_id))

    def mean_loss(self) -> float:
        """Token-weighted loss over the whole set with the current prompts (no grad)."""
        total, count = 0.0, 0
        with torch.no_grad():
            folded = self.learner.as_folded()
            for start in range(0, len(self.encoded), self.cfg.batch_size):
                ids, mask, labels, px = self._batch(self.encoded[start : start + self.cfg.batch_size])
                n = int((labels[:, 1:] != IGNORE).sum())
                total += float(answer_loss(explicit_forward(self.model, ids, mask, px, folded), labels)) * n
                count += n
        return total / count

    def greedy(self, enc: Encoded) -> str:
        """Greedy answer by repeated explicit forwards (no cache: short answers, small models)."""
        tok = self.processor.tokenizer
        ids = enc.prompt_ids[None].to(self.device)
        px = enc.pixel_values[None].to(self.device)
        out: list[int] = []
        with torch.no_grad():
            folded = self.learner.as_folded()
            for _ in range(self.cfg.max_new_tokens):
                logits = explicit_forward(self.model, ids, torch.ones_like(ids), px, folded)
                nxt = int(logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                out.append(nxt)
                ids = torch.cat([ids, ids.new_tensor([[nxt]])], dim=1)
        return tok.decode(out, skip_special_tokens=True).strip()

    def show(self) -> list[str]:
        return [self.greedy(e) for e in self.encoded[:SHOW_EXAMPLES]]

    # ------------------------------------------------------------ the loop's parts

    def run_facts(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "backbone": llava_fingerprint(self.model.config), "data": examples_fingerprint(self.examples),
            "n_vision": c.n_vision, "n_text": c.n_text, "lr": c.lr, "weight_decay": c.weight_decay,
            "batch_size": c.batch_size, "seed": c.seed, "total_steps": self.total_steps,
            "max_new_tokens": c.max_new_tokens,
        }  # fmt: skip

    def state(self) -> dict[str, Any]:
        return {"loss_start": self.loss_start, "answers_before": self.answers_before}

    def load_state(self, state: dict[str, Any]) -> None:
        self.loss_start, self.answers_before = float(state["loss_start"]), list(state["answers_before"])

    def before(self) -> None:
        self.loss_start = self.mean_loss()
        self.answers_before = self.show()

    def intro(self) -> str:
        lines = [f"{len(self.encoded)} examples; loss before {self.loss_start:.4f}"]
        lines += [f"  before [{i}] {a!r}" for i, a in enumerate(self.answers_before)]
        return "\n".join(lines)

    def batch_loss(self, indices: list[int]) -> tuple[torch.Tensor, str]:
        ids, mask, labels, px = self._batch([self.encoded[j] for j in indices])
        return answer_loss(explicit_forward(self.model, ids, mask, px, self.learner.as_folded()), labels), ""

    def after_step(self, loss: float) -> None:
        self.history.append(loss)

    def result(self, seconds: float) -> M2ptTrainResult:
        c = self.cfg
        loss_end = self.mean_loss()
        after = self.show()
        self.log.write(f"loss after {loss_end:.4f}\n")
        hp: dict[str, Any] = {
            "steps": self.step, "lr": c.lr, "seed": c.seed, "batch_size": c.batch_size,
            "n_examples": len(self.encoded), "loss_start": round(self.loss_start, 6), "loss_end": round(loss_end, 6),
        }  # fmt: skip
        data = dump(
            fold(self.learner), name=c.adapter_name(),
            backbone=with_weights(llava_fingerprint(self.model.config), self.model),
            description=c.description, hyperparameters=hp,
        )  # fmt: skip
        return M2ptTrainResult(
            adapter=data, steps=self.step, loss_start=self.loss_start, loss_end=loss_end,
            answers_before=self.answers_before, answers_after=after, examples=self.examples, seconds=seconds,
            history=self.history,
        )  # fmt: skip


def train_m2pt(config: M2ptTrainConfig, *, log: TextIO | None = None) -> M2ptTrainResult:
    """Load the backbone, train, and write the adapter file (atomically) to ``config.output``."""
    model, processor = load_llava(config.backbone, resolve_device(config.device))
    result = M2ptTrainer(config, model, processor, log=log).run()
    write_atomic(Path(config.output), result.adapter)
    return result
