"""`loraserve validate-adapter PATH`: parse an adapter artifact and print what it holds, or why not.

Also runnable as `python -m loraserve.adapters PATH`. Exit status 0 if valid, 2 if rejected.
"""
from __future__ import annotations

import argparse
import json
import sys

from .errors import AdapterFormatError
from .loader import load_adapter, validate_artifact


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("validate-adapter", help="parse and check a LoRA adapter artifact")
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="HF PEFT dir / weights file / .tar(.gz) / .zip, or .nemo")
    parser.add_argument("--ckpt-source", choices=["hf", "nemo"], default=None,
                        help="expected format (default: detect)")
    parser.add_argument("--max-rank", type=int, default=None)
    parser.add_argument("--max-bytes", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    try:
        if args.ckpt_source is None:
            adapter = validate_artifact(args.path, max_rank=args.max_rank, max_bytes=args.max_bytes)
        else:
            adapter = load_adapter(args.path, args.ckpt_source, max_rank=args.max_rank,
                                   max_bytes=args.max_bytes)
    except AdapterFormatError as e:
        print(f"invalid adapter: {e}", file=sys.stderr)
        return 2
    summary = {
        "format": adapter.format, "rank": adapter.rank, "alpha": adapter.alpha,
        "use_rslora": adapter.use_rslora, "use_dora": adapter.is_dora, "target_modules": adapter.target_modules,
        "num_layers": adapter.num_layers, "dtype": str(adapter.dtype).removeprefix("torch."),
        "module_shapes": {m: list(s) for m, s in adapter.module_shapes().items()},
        "nbytes": adapter.nbytes(), "digest": adapter.digest,
    }
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraserve.adapters", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
