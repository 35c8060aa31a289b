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
    add_log_format(parser, "text")
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


def add_log_format(parser: argparse.ArgumentParser, default=argparse.SUPPRESS) -> None:
    """--log-format, on the top-level parser and on each server command (so it may follow the command);
    a subcommand's copy defaults to SUPPRESS so that it never overwrites the top-level value."""
    parser.add_argument("--log-format", dest="log_format", choices=("text", "json"), default=default,
                        help="log lines as text or as one JSON object a line (request fields as keys; default text)")


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
    from loraserve.logging_setup import setup_logging

    setup_logging(args.log_level, args.log_format)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
