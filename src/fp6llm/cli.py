"""The ``fp6llm`` command: thin subcommands that parse arguments and call the library.

Each subcommand lives in a module of ``fp6llm.commands`` and registers itself in ``COMMANDS`` through ``command``.
A command checks its arguments before any work (the helpers below raise ValueError naming the option); errors a
user can cause (ValueError, TypeError, FileNotFoundError, ...) become one line on stderr and exit status 2, with
no traceback; Ctrl-C, at any point (torch's import included), prints one line and exits with 130.

The command modules import torch inside their commands, not at the top: ``fp6llm --help`` never imports it.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import pkgutil
import signal
import sys
from pathlib import Path

COMMANDS = {}
INTERRUPTED_STATUS = 130  # 128 + SIGINT, as a shell reports a process that Ctrl-C stopped
DEVICE_TYPES = ("cpu", "cuda")


def command(name: str, help: str):
    """Register ``add_arguments(parser)`` for subcommand ``name``; the parser's ``run`` default does the work."""
    def register(add_arguments):
        COMMANDS[name] = (help, add_arguments)
        return add_arguments
    return register


USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               KeyError, MemoryError)


def at_least(option: str, value, low, what: str = "") -> None:
    """ValueError unless ``value`` (of ``option``; None passes) is >= low (and finite)."""
    if value is not None and not (value >= low and math.isfinite(value)):
        raise ValueError(f"{option} must be >= {low}{what}, got {value}")


def check_device(name: "str | None") -> "str | None":
    """``name`` if it is cpu, cuda or cuda:N and that device exists here; None (the default) passes."""
    if name is None:
        return None
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device: use cpu or cuda (cuda:N for GPU N)") from None
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"--device {name}: fp6llm runs on cpu or cuda, not {device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(f"--device {name}: no CUDA device is available here (torch {torch.__version__}, "
                             f"{build}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def read_text_file(name: str, option: str) -> str:
    """The UTF-8 text of file ``name`` (given as ``option``), with errors that name the file."""
    path = Path(name)
    if not path.exists():
        raise FileNotFoundError(f"{option} {path} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"{option} {path} is a directory, not a text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{option} {path} is not UTF-8 text (byte {err.start}: {err.reason})") from None


def check_output_dir(name: str, option: str) -> Path:
    """``name`` as a Path if it is a directory or does not exist yet (it will be created); else ValueError."""
    path = Path(name)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} exists and is not a directory")
    return path


def check_output_file(name: str, option: str) -> Path:
    """``name`` as a Path if a file can be written there: not a directory, in a directory that exists."""
    path = Path(name)
    if path.is_dir():
        raise IsADirectoryError(f"{option} {path} is a directory, not a file")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{option} {path}: directory {path.parent} does not exist")
    return path


def model_arguments(parser: argparse.ArgumentParser, formats: "str | bool" = False) -> None:
    """--model / --random (model_source reads them), --format (or --formats with that default), --group-size,
    --device: the options of every command that loads a model."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="DIR", help="a Hugging Face checkpoint or an fp6llm packed checkpoint "
                                                       "(default: the embedded stdlib-lm-e3m2)")
    source.add_argument("--random", metavar="NAME", help="random weights of a named shape (llama-2-7b, tiny-llama, "
                                                         "...); a byte tokenizer, no downloads")
    if formats:
        parser.add_argument("--formats", default=formats, help=f"comma-separated formats (default {formats}; "
                                                               f"e3m2+head=e2m5: lm_head in e2m5 too)")
    else:
        parser.add_argument("--format", default=None, help="weight format: e3m2 (FP6), any eXmY, or fp16 / bf16 / "
                                                           "fp32 (default e3m2; a packed checkpoint's own); "
                                                           "+head=FORMAT quantizes lm_head too, e.g. e3m2+head=e2m5")
    parser.add_argument("--group-size", type=int, default=None, help="one scale per this many input columns "
                                                                     "(default: one per output channel)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


def check_model_arguments(args) -> None:
    """The checks of model_arguments' options, before any work: ValueError naming the option."""
    fmt = getattr(args, "format", None)
    if fmt is not None and not fmt.strip():
        raise ValueError("--format is empty: give a format such as e3m2, or leave --format out")
    at_least("--group-size", args.group_size, 1)
    check_device(args.device)


def tp_argument(parser: argparse.ArgumentParser) -> None:
    """--tp N: the tensor-parallel degree of a command that runs under torchrun."""
    parser.add_argument("--tp", type=int, default=1, metavar="N",
                        help="tensor-parallel degree: N GPUs each hold 1/N of every block; launch with torchrun "
                             "--nproc-per-node N -m fp6llm ... --tp N (default 1: one process, no torch.distributed)")


def model_source(args):
    """The ModelSource of model_arguments' --model DIR / --random NAME (neither: the embedded default model)."""
    from .engine.load import ModelSource
    return ModelSource.random(args.random) if args.random else ModelSource.parse(args.model)  # None: default


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


_interrupted = []


def _quiet_unraisable(unraisable) -> None:
    """sys.unraisablehook: a KeyboardInterrupt raised where Python cannot propagate it (an import's weakref callback,
    seen in CI on 2026-12-02) is remembered by _on_sigint already, so it prints nothing (not "Exception ignored ...
    Traceback"); anything else goes to the hook it replaced."""
    if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
        return
    _previous_unraisablehook[0](unraisable)


_previous_unraisablehook = [sys.unraisablehook]


def _on_sigint(signum, frame):
    # Remember it as well as raising: an import that swallows the KeyboardInterrupt (seen once while torch imported)
    # must not turn a Ctrl-C into a normal exit.
    _interrupted.append(signum)
    if not _decided:
        raise KeyboardInterrupt
    # The exit status is decided (main is returning or the interpreter is tearing down): a KeyboardInterrupt raised
    # now would escape main and Python would end by SIGINT (status -2, seen in CI on 2026-12-02), so end at once.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a flush interrupted mid-write (reentrant call): what was written stays written
            pass
    os._exit(INTERRUPTED_STATUS)


_decided = False  # set once _main knows its exit status; _on_sigint raises only before


def main(argv=None) -> int:
    """The command line: ``argv`` (sys.argv[1:] when None) -> exit status. Called from Python (``argv`` given), it
    gives the caller's SIGINT handler back on return; the console script keeps the CLI's through the teardown."""
    global _decided
    previous = signal.getsignal(signal.SIGINT)
    _decided = False
    _interrupted.clear()
    try:
        status = _main(argv)  # it sets _decided once its status is known
    finally:
        if argv is not None and previous is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous)
    distributed = sys.modules.get("fp6llm.engine.distributed")  # imported only by --tp runs
    if distributed is not None and distributed.left_group:
        # a tensor-parallel rank: its work is done and written; skip the interpreter teardown that can abort in
        # gloo's threads (engine/distributed.left_group)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _main(argv) -> int:
    global _decided
    name = "fp6llm"
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
        if sys.unraisablehook is not _quiet_unraisable:
            _previous_unraisablehook[0] = sys.unraisablehook
            sys.unraisablehook = _quiet_unraisable
    try:
        try:
            args = build_parser().parse_args(argv)
            name = f"fp6llm {args.command}"
            args.run(args)
        finally:
            _decided = True  # from here on a Ctrl-C is recorded (or ends the process), never raised
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return INTERRUPTED_STATUS
    except Exception as err:
        if _interrupted:
            # An error after a Ctrl-C that something swallowed is its fallout, not a bug to report: a
            # KeyboardInterrupt inside an import leaves the module half made (CI, 2026-12-03: numpy.linalg's
            # lazy import then recursed without end when torch._dynamo touched it).
            print(f"{name}: interrupted", file=sys.stderr)
            return INTERRUPTED_STATUS
        if isinstance(err, USER_ERRORS):
            print(f"{name}: error: {err}", file=sys.stderr)
            return 2
        raise
    if _interrupted:
        print(f"{name}: interrupted", file=sys.stderr)
        return INTERRUPTED_STATUS
    return 0


if __name__ == "__main__":
    sys.exit(main())
