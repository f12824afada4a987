"""``python -m studio <command>``: the same functions the UI uses, for headless use.

Each command lives in its own module, which exposes ``add_cli(subparsers)`` and keeps its heavy
imports inside the command function, so ``--help`` stays fast. A StudioError is printed as a plain
message (with what to do) and the process exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module exposing add_cli(subparsers); order is the order shown in --help
COMMAND_MODULES = [
    "studio.tiny_cli",
    "studio.models.cli",
    "studio.adapters.cli",
    "studio.merge.cli",
    "studio.dataset.cli",
    "studio.train.cli",
    "studio.generate.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m studio",
                                     description="Adapter Studio: train, merge, inspect and test SD adapters.")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and name.startswith(err.name):
                continue  # a command whose module is not part of this build yet
            raise
        module.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from studio.errors import StudioError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        result = args.func(args)
    except StudioError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return 130
    return int(result or 0)
