"""Adapter commands: ``import-maple``, ``inspect``, ``validate``, ``train maple``, ``train m2pt``, ``upload``.

``register(subparsers)`` adds them to any argparse subparsers object (the service
wires them as ``promptswap adapters <cmd>``); each sets ``func(args) -> exit code``.
``python -m adapters.cli <cmd>`` runs them standalone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from adapters.errors import AdapterError, AdapterMismatch
from adapters.format import read_adapter_file, validate_for_backbone
from adapters.method import Method

# Far above any adapter: MaPLe ViT-L/14 J=12 ~0.1 MB, M2PT on a 7B LLaVA (10+10 prompts) ~21 MB.
DEFAULT_MAX_BYTES = 64 << 20


def _config_for(method: Method[Any], ident: str) -> Any:
    """The backbone's config, refused unless it is the kind of model the method runs on."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(ident)
    if not isinstance(config, method.config_type):
        raise AdapterMismatch(
            f"a {method.name} adapter needs a {method.arch} backbone; {ident} is a {config.model_type} model",
            field="arch", expected=method.arch, got=config.model_type,
        )  # fmt: skip
    return config


def cmd_import_maple(args: argparse.Namespace) -> int:
    from transformers import CLIPModel

    from adapters.importers import convert_maple_checkpoint
    from adapters.weights import weights_digest

    # The backbone's weights, not only its config: the adapter then names the checkpoint.
    model = CLIPModel.from_pretrained(args.backbone)
    data = convert_maple_checkpoint(
        args.checkpoint,
        model.config,
        name=args.name,
        description=args.description,
        ctx_init=args.ctx_init,
        weights=weights_digest(model),
    )
    out = Path(args.output or f"{args.name}.safetensors")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(out)  # never leave a half-written adapter under the final name
    print(f"wrote {out} ({len(data)} bytes)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    adapter = read_adapter_file(args.file, max_bytes=args.max_bytes)
    print(json.dumps(json.loads(adapter.manifest.to_json()), indent=2, sort_keys=True))
    for name, t in adapter.tensors().items():
        print(f"{name}: shape {list(t.shape)} stored {adapter.tensor_dtypes.get(name)}")
    print(f"folded bytes (fp32): {adapter.folded.nbytes}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    adapter = read_adapter_file(args.file, max_bytes=args.max_bytes)
    method = adapter.method
    validate_for_backbone(adapter, method.fingerprint(_config_for(method, args.backbone)))
    print("ok")
    return 0


_MAX_BYTES_HELP = f"refuse files larger than this (default: {DEFAULT_MAX_BYTES})"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("import-maple", help="convert a MaPLe reference checkpoint to an adapter file")
    p.add_argument("checkpoint", help="model.pth.tar-N file or Dassl output directory")
    p.add_argument("--backbone", required=True, help="CLIP hub id or local directory")
    p.add_argument("--name", required=True, help="adapter name: [a-z0-9][a-z0-9._-]{0,63}")
    p.add_argument("-o", "--output", help="output file (default: NAME.safetensors)")
    p.add_argument("--description", default="", help="free text stored in the manifest")
    p.add_argument(
        "--ctx-init",
        default="a photo of a",
        help="the run's CTX_INIT (not stored in checkpoints); sets the manifest's prompt template",
    )
    p.set_defaults(func=_guarded(cmd_import_maple))

    p = subparsers.add_parser("inspect", help="print an adapter's manifest and tensor shapes (any method)")
    p.add_argument("file", help="the adapter file (.safetensors)")
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help=_MAX_BYTES_HELP)
    p.set_defaults(func=_guarded(cmd_inspect))

    p = subparsers.add_parser("validate", help="check an adapter file against a backbone (any method)")
    p.add_argument("file", help="the adapter file (.safetensors)")
    p.add_argument(
        "--backbone", required=True, help="hub id or local directory of the backbone it will run on"
    )
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help=_MAX_BYTES_HELP)
    p.set_defaults(func=_guarded(cmd_validate))

    from adapters.cli_train import register_training  # train maple, upload

    register_training(subparsers, _guarded)


def _guarded(cmd):  # (Namespace -> int) -> (Namespace -> int)
    """Expected failures become one line on stderr and exit 1, not a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return cmd(args)
        except AdapterError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except OSError as e:  # unreadable file, backbone config not found
            print(f"error: {e}", file=sys.stderr)
            return 1

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adapters.cli", description=__doc__.splitlines()[0])
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
