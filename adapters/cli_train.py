"""``train maple``, ``train m2pt`` and ``upload``: from training data to an adapter served by a running service.

The ``train`` options are generated from the config dataclasses (``adapters.options``),
so each default is written once, beside its help text. Kept apart from ``adapters.cli``
so the training options live next to each other; the heavy imports (torch,
transformers) happen only when a command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adapters.options import add_options, from_args, option

Command = Callable[[argparse.Namespace], int]


@dataclass
class UploadOptions:
    upload: str | None = option(
        "then upload the adapter to this service (e.g. http://localhost:8000)", None, metavar="URL"
    )
    token: str | None = option("admin token for --upload (prefer the env PROMPTSWAP_ADMIN_TOKEN)", None)


def _train(args: argparse.Namespace, train: Callable[[], tuple[bytes, list[str]]]) -> int:
    """Run ``train`` (the adapter bytes and summary lines), print, write, upload; Ctrl-C leaves a checkpoint."""
    from adapters.upload import resolve_token

    target = from_args(UploadOptions, args)
    token = resolve_token(target.token) if target.upload else None  # fail before training, not after
    try:
        adapter, summary = train()
    except KeyboardInterrupt:
        print("interrupted; run the same command with --resume to continue", file=sys.stderr)
        return 130
    for line in summary:
        print(line)
    print(f"wrote {args.output} ({len(adapter)} bytes)")
    if target.upload:
        return _upload(adapter, Path(args.output).name, target.upload, token, name=None)
    return 0


def cmd_train_maple(args: argparse.Namespace) -> int:
    from adapters.training_maple import TrainConfig, train_maple

    def train() -> tuple[bytes, list[str]]:
        result = train_maple(from_args(TrainConfig, args))
        return result.adapter, [
            f"held-out accuracy on {len(result.held_out)} images ({result.steps} steps, {result.seconds:.1f} s):",
            f"  zero-shot  {result.zero_shot_accuracy:6.1%}",
            f"  adapter    {result.accuracy:6.1%}",
        ]

    return _train(args, train)


def cmd_train_m2pt(args: argparse.Namespace) -> int:
    from adapters.training_m2pt import M2ptTrainConfig, train_m2pt

    def train() -> tuple[bytes, list[str]]:
        r = train_m2pt(from_args(M2ptTrainConfig, args))
        lines = [f"answer loss {r.loss_start:.4f} -> {r.loss_end:.4f} ({r.steps} steps, {r.seconds:.1f} s)"]
        for i, (before, after) in enumerate(zip(r.answers_before, r.answers_after, strict=True)):
            lines.append(f"  [{i}] target {r.examples[i].answer!r}: before {before!r}, after {after!r}")
        return r.adapter, lines

    return _train(args, train)


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
    # The config classes import torch; argparse needs only their fields, so import them here.
    from adapters.training_m2pt import M2ptTrainConfig
    from adapters.training_maple import TrainConfig

    train = subparsers.add_parser("train", help="train a prompt adapter on a frozen backbone")
    methods = train.add_subparsers(dest="method", required=True)
    p = methods.add_parser(
        "maple",
        help="few-shot MaPLe prompts on a frozen CLIP",
        description="Train MaPLe prompts on DATA (one sub-folder per class, folder name = label); "
        "only the prompts learn, the backbone stays frozen. Ctrl-C leaves a checkpoint; --resume continues.",
    )
    add_options(p, TrainConfig)
    add_options(p, UploadOptions)
    p.set_defaults(func=guarded(cmd_train_maple))

    p = methods.add_parser(
        "m2pt",
        help="M2PT instruction tuning of a frozen LLaVA",
        description="Train M2PT prompts (vision, text, interaction layer) on DATA, a JSONL file of "
        '{"image": path relative to the file, "instruction": ..., "answer": ...}; the backbone stays frozen. '
        "Ctrl-C leaves a checkpoint; --resume continues.",
    )
    add_options(p, M2ptTrainConfig)
    add_options(p, UploadOptions)
    p.set_defaults(func=guarded(cmd_train_m2pt))

    p = subparsers.add_parser("upload", help="upload an adapter file to a running service")
    p.add_argument("file", help="the adapter file (.safetensors)")
    p.add_argument("--url", required=True, help="service base URL, e.g. http://localhost:8000")
    p.add_argument("--token", help="admin token (prefer the env PROMPTSWAP_ADMIN_TOKEN)")
    p.add_argument("--name", help="store under this name instead of the manifest's")
    p.set_defaults(func=guarded(cmd_upload))
