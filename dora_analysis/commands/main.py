"""`python -m dora_analysis <command>`: a thin dispatcher; each command lives in `commands/<name>.py`.

A command module defines ``add_arguments(parser)`` and ``run(args) -> int`` and a one-line docstring.
The CLI only parses options and consumes DataFrames; errors the toolkit raises on purpose
(:class:`~dora_analysis.errors.DoraAnalysisError`) become one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dora_analysis.errors import DoraAnalysisError

COMMANDS = ("compare", "series", "figures", "train", "demo", "study")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except DoraAnalysisError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
