"""`loraserve` command line: one entry point, subcommands contributed by each service.

    loraserve serve ...              inference gRPC service     (loraserve.inference.cli)
    loraserve generate ...           streaming client           (loraserve.inference.cli)
    loraserve registry serve ...     adapter registry service   (loraserve.registry.cli)
    loraserve adapter push|ls|...    registry client            (loraserve.registry.cli)
    loraserve bench ...              benchmarks                 (loraserve.inference.bench.cli)

Each module exposes `add_commands(subparsers)`; a subcommand sets `func(args) -> int`.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMAND_MODULES = (
    "loraserve.inference.cli",
    "loraserve.registry.cli",
    "loraserve.adapters.cli",
    "loraserve.inference.bench.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraserve", description="Multi-LoRA LLM serving")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # that part of the product is not installed in this build
            raise
        module.add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse cannot take more of a nargs="*" positional after an option (`tag NAME --alias A key=v`);
        # a command that names such a positional in `extra_positionals` gets the leftovers appended
        dest = getattr(args, "extra_positionals", None)
        if dest is None or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        getattr(args, dest).extend(extra)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
