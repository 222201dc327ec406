"""The ``fp6llm`` command: thin subcommands that parse arguments and call the library.

Each subcommand lives in a module of ``fp6llm.commands`` and registers itself in ``COMMANDS`` through
``command``; errors a user can cause (ValueError,
TypeError, FileNotFoundError, ...) become one line on stderr and exit status 2, with no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

COMMANDS = {}


def command(name: str, help: str):
    """Register ``add_arguments(parser)`` for subcommand ``name``; the parser's ``run`` default does the work."""
    def register(add_arguments):
        COMMANDS[name] = (help, add_arguments)
        return add_arguments
    return register


USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, KeyError, MemoryError)


def _load_commands() -> None:
    """Import every module of fp6llm.commands; each registers its subcommands with ``command``."""
    from . import commands
    for info in pkgutil.iter_modules(commands.__path__):
        importlib.import_module(f"{commands.__name__}.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    _load_commands()
    parser = argparse.ArgumentParser(prog="fp6llm", description="FP6 / FPx weight-only LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help, add_arguments) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help, description=help))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except USER_ERRORS as err:
        print(f"fp6llm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fp6llm {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
