"""M²PT instruction tuning on a frozen LLaVA, through the same explicit prompted forward.

Only the prompt learner trains (vision prompts, text prompts, the interaction layer): every
backbone weight has ``requires_grad`` False and is never handed to the optimizer. Each
example is the processor's chat prompt (one image part + the instruction, with the
generation prompt) followed by the answer tokens and eos; the loss is cross-entropy on the
answer and eos positions only, from ``adapters.prompted_llava.explicit_forward`` fed with
``learner.as_folded()`` (differentiable). Batches are left-padded, as that forward expects.

No checkpoints or resume here (MaPLe's trainer has them); a run is short and a function of
its config (seed, data order).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from adapters.checkpoint import write_atomic
from adapters.errors import AdapterValueError
from adapters.format import dump
from adapters.m2pt import M2ptConfig, M2ptPromptLearner, fold, llava_fingerprint
from adapters.prompted_llava import explicit_forward
from adapters.training import resolve_device

IGNORE = -100
SHOW_EXAMPLES = 3  # greedy answers printed before and after


@dataclass
class M2ptTrainConfig:
    backbone: str  # local LLaVA directory (or hub id)
    data: str  # JSONL: {"image": path relative to the file's folder, "instruction": ..., "answer": ...}
    output: str
    name: str | None = None  # adapter name; default: the output file's stem
    n_vision: int = 4
    n_text: int = 4
    lr: float = 0.01
    weight_decay: float = 0.0
    steps: int = 60
    batch_size: int = 4
    seed: int = 0
    device: str = "auto"
    max_new_tokens: int = 12
    description: str = ""

    def adapter_name(self) -> str:
        return self.name or Path(self.output).stem.lower()


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
    model = LlavaForConditionalGeneration.from_pretrained(ident, dtype=torch.float32)
    model.requires_grad_(False)
    model.eval()
    # transformers wraps .to with functools.wraps, so type checkers lose its self
    return torch.nn.Module.to(model, device), AutoProcessor.from_pretrained(ident)


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


class M2ptTrainer:
    def __init__(
        self,
        config: M2ptTrainConfig,
        model: LlavaForConditionalGeneration,
        processor: Any,
        *,
        log: TextIO | None = None,
    ) -> None:
        self.cfg, self.model, self.processor = config, model, processor
        self.log = sys.stderr if log is None else log
        self.device = next(model.parameters()).device
        if config.steps < 1 or config.batch_size < 1:
            raise AdapterValueError("steps and batch size must be >= 1")
        self.examples = read_examples(config.data)
        self.encoded = [encode_example(processor, e) for e in self.examples]
        tok = processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        m2pt = M2ptConfig.for_llava(model.config, n_vision=config.n_vision, n_text=config.n_text)
        torch.manual_seed(config.seed)  # the learner's random init
        self.learner = M2ptPromptLearner(m2pt).to(self.device)
        self.optimizer = torch.optim.AdamW(
            self.learner.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.generator = torch.Generator().manual_seed(config.seed)  # the data order

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

    def order(self) -> list[int]:
        return torch.randperm(len(self.encoded), generator=self.generator).tolist()

    def run(self) -> M2ptTrainResult:
        c, log = self.cfg, self.log
        started = time.monotonic()
        loss_start = self.mean_loss()
        before = self.show()
        print(f"{len(self.encoded)} examples; loss before {loss_start:.4f}", file=log)
        for i, a in enumerate(before):
            print(f"  before [{i}] {a!r}", file=log)
        history: list[float] = []
        queue: list[int] = []
        every = max(1, c.steps // 20)
        self.learner.train()
        for step in range(1, c.steps + 1):
            while len(queue) < c.batch_size:
                queue += self.order()
            picked, queue = queue[: c.batch_size], queue[c.batch_size :]
            ids, mask, labels, px = self._batch([self.encoded[j] for j in picked])
            loss = answer_loss(explicit_forward(self.model, ids, mask, px, self.learner.as_folded()), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            history.append(float(loss.detach()))
            if step % every == 0 or step == c.steps:
                rate = step / max(time.monotonic() - started, 1e-9)
                print(
                    f"step {step:>6}/{c.steps}  loss {history[-1]:.4f}  ({rate:.1f} it/s)",
                    file=log,
                    flush=True,
                )
        self.learner.eval()
        loss_end = self.mean_loss()
        after = self.show()
        print(f"loss after {loss_end:.4f}", file=log)
        for i, a in enumerate(after):
            print(f"  after  [{i}] {a!r}  (target {self.examples[i].answer!r})", file=log)
        hp: dict[str, Any] = {
            "steps": c.steps, "lr": c.lr, "seed": c.seed, "batch_size": c.batch_size,
            "n_examples": len(self.encoded), "loss_start": round(loss_start, 6), "loss_end": round(loss_end, 6),
        }  # fmt: skip
        data = dump(
            fold(self.learner), name=c.adapter_name(), backbone=llava_fingerprint(self.model.config),
            description=c.description, hyperparameters=hp,
        )  # fmt: skip
        return M2ptTrainResult(
            adapter=data, steps=c.steps, loss_start=loss_start, loss_end=loss_end, answers_before=before,
            answers_after=after, examples=self.examples, seconds=time.monotonic() - started, history=history,
        )  # fmt: skip


def train_m2pt(config: M2ptTrainConfig, *, log: TextIO | None = None) -> M2ptTrainResult:
    """Load the backbone, train, and write the adapter file (atomically) to ``config.output``."""
    model, processor = load_llava(config.backbone, resolve_device(config.device))
    result = M2ptTrainer(config, model, processor, log=log).run()
    write_atomic(Path(config.output), result.adapter)
    return result
