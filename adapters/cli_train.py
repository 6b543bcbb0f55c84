"""``train maple`` and ``upload``: from an image folder to an adapter served by a running service.

Kept apart from ``adapters.cli`` so the training options live next to each other; the
heavy imports (torch, transformers) happen only when a command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

Command = Callable[[argparse.Namespace], int]


def cmd_train_maple(args: argparse.Namespace) -> int:
    from adapters.training import TrainConfig, train_maple
    from adapters.upload import resolve_token

    token = resolve_token(args.token) if args.upload else None  # fail before training, not after
    config = TrainConfig(
        backbone=args.backbone, data=args.data, output=args.output, name=args.name, shots=args.shots,
        epochs=args.epochs, max_steps=args.max_steps, n_ctx=args.n_ctx, depth=args.depth, lr=args.lr,
        weight_decay=args.weight_decay, batch_size=args.batch_size, seed=args.seed, template=args.template,
        eval_fraction=args.eval_fraction, eval_every=args.eval_every, device=args.device, amp=args.amp,
        checkpoint_dir=args.checkpoint_dir, resume=args.resume, description=args.description,
    )  # fmt: skip
    try:
        result = train_maple(config)
    except KeyboardInterrupt:
        print("interrupted; run the same command with --resume to continue", file=sys.stderr)
        return 130
    n = len(result.held_out)
    print(f"held-out accuracy on {n} images ({result.steps} steps, {result.seconds:.1f} s):")
    print(f"  zero-shot  {result.zero_shot_accuracy:6.1%}")
    print(f"  adapter    {result.accuracy:6.1%}")
    print(f"wrote {args.output} ({len(result.adapter)} bytes)")
    if args.upload:
        return _upload(result.adapter, Path(args.output).name, args.upload, token, name=None)
    return 0


def cmd_train_m2pt(args: argparse.Namespace) -> int:
    from adapters.training_m2pt import M2ptTrainConfig, train_m2pt

    config = M2ptTrainConfig(
        backbone=args.backbone, data=args.data, output=args.output, name=args.name, n_vision=args.n_vision,
        n_text=args.n_text, lr=args.lr, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
        device=args.device, description=args.description,
    )  # fmt: skip
    result = train_m2pt(config)
    print(
        f"answer loss {result.loss_start:.4f} -> {result.loss_end:.4f} ({result.steps} steps, {result.seconds:.1f} s)"
    )
    for i, (before, after) in enumerate(zip(result.answers_before, result.answers_after, strict=True)):
        print(f"  [{i}] target {result.examples[i].answer!r}: before {before!r}, after {after!r}")
    print(f"wrote {args.output} ({len(result.adapter)} bytes)")
    return 0


def cmd_upload(args: argparse.Namespace) -> int:
    from adapters.upload import resolve_token

    token = resolve_token(args.token)
    data = Path(args.file).read_bytes()
    return _upload(data, Path(args.file).name, args.url, token, name=args.name)


def _upload(data: bytes, filename: str, url: str, token: str | None, *, name: str | None) -> int:
    from adapters.upload import upload_adapter

    assert token is not None
    answer = asyncio.run(upload_adapter(data, url, token, filename=filename, name=name))
    print(f"uploaded as {answer['key']}")
    return 0


def register_training(subparsers: argparse._SubParsersAction, guarded: Callable[[Command], Command]) -> None:
    train = subparsers.add_parser("train", help="train a prompt adapter on an image folder")
    methods = train.add_subparsers(dest="method", required=True)
    p = methods.add_parser(
        "maple",
        help="few-shot MaPLe prompts on a frozen CLIP",
        description="Train MaPLe prompts on DATA (one sub-folder per class, folder name = label); "
        "only the prompts learn, the backbone stays frozen. Ctrl-C leaves a checkpoint; --resume continues.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--backbone", required=True, help="CLIP hub id or local directory (the one you serve)")
    p.add_argument("--data", required=True, help="image folder: one sub-folder per class")
    p.add_argument("-o", "--output", required=True, help="adapter file to write")
    p.add_argument("--name", help="adapter name (default: the output file's stem)")
    p.add_argument("--shots", type=int, default=16, help="training images per class; the rest are held out")
    p.add_argument("--epochs", type=int, default=50, help="passes over the few-shot set")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--n-ctx", type=int, default=2, help="prompt tokens per layer")
    p.add_argument("--depth", type=int, default=9, help="layers that get prompts (J)")
    p.add_argument("--lr", type=float, default=0.01, help="AdamW learning rate (cosine schedule)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--template", default="a photo of a {}.", help="prompt; serve with the same one")
    p.add_argument(
        "--eval-fraction", type=float, default=1.0, help="share of the non-training images held out"
    )
    p.add_argument("--eval-every", type=int, default=1, help="epochs between held-out evaluations")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--amp", choices=["auto", "bf16", "fp16", "off"], default="auto", help="mixed precision (CUDA only)"
    )
    p.add_argument("--checkpoint-dir", help="where checkpoints go (default: OUTPUT.ckpt)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--description", default="", help="free text stored in the manifest")
    p.add_argument("--upload", metavar="URL", help="then upload to this service (e.g. http://localhost:8000)")
    p.add_argument("--token", help="admin token for --upload (prefer the env PROMPTSWAP_ADMIN_TOKEN)")
    p.set_defaults(func=guarded(cmd_train_maple))

    p = methods.add_parser(
        "m2pt",
        help="M2PT instruction tuning of a frozen LLaVA",
        description="Train M2PT prompts (vision, text, interaction layer) on DATA, a JSONL file of "
        '{"image": path relative to the file, "instruction": ..., "answer": ...}; the backbone stays frozen.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--backbone", required=True, help="LLaVA directory or hub id (the one you serve)")
    p.add_argument("--data", required=True, help="JSONL instruction set")
    p.add_argument("-o", "--output", required=True, help="adapter file to write")
    p.add_argument("--name", help="adapter name (default: the output file's stem)")
    p.add_argument("--n-vision", type=int, default=4, help="visual prompts per vision layer")
    p.add_argument("--n-text", type=int, default=4, help="textual prompts per LLM layer")
    p.add_argument("--lr", type=float, default=0.01, help="AdamW learning rate")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--description", default="", help="free text stored in the manifest")
    p.set_defaults(func=guarded(cmd_train_m2pt))

    p = subparsers.add_parser("upload", help="upload an adapter file to a running service")
    p.add_argument("file")
    p.add_argument("--url", required=True, help="service base URL, e.g. http://localhost:8000")
    p.add_argument("--token", help="admin token (prefer the env PROMPTSWAP_ADMIN_TOKEN)")
    p.add_argument("--name", help="store under this name instead of the manifest's")
    p.set_defaults(func=guarded(cmd_upload))
