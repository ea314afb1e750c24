"""Compare a pre-trained checkpoint with a fine-tuned one: ΔM and ΔD per tensor.

BASE is the pre-trained checkpoint (a .safetensors/.bin/.pt file or a Hugging Face folder); TUNED a
fine-tuned checkpoint, a Trainer checkpoint-<step> folder, or a LoRA/DoRA adapter folder over BASE.
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd

__all__ = ["add_arguments", "run", "summary_line"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", help="pre-trained checkpoint (file or folder)")
    parser.add_argument("tuned", help="fine-tuned checkpoint, checkpoint-<step> folder or adapter folder")
    add_output_arguments(parser)
    parser.add_argument(
        "--include", metavar="REGEX", help="analyse tensors whose name matches (default: 2-D linear weights)"
    )
    parser.add_argument("--exclude", metavar="REGEX", help="skip tensors whose name matches")
    add_device_argument(parser)


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device``, shared by the commands that analyse checkpoints."""
    parser.add_argument(
        "--device", metavar="DEVICE", help="analyse on this torch device, e.g. cuda or cuda:1 (default: CPU)"
    )


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--format``, ``--output`` and ``--overwrite``, shared by the commands that print a table."""
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    parser.add_argument("--output", metavar="FILE", help="write here (atomically) instead of stdout")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")


def summary_line(frame: pd.DataFrame) -> str:
    """One line: how many tensors, the mean ΔM and ΔD, and what was left out."""
    ok = frame[frame["status"] == "ok"]
    parts = [f"{len(frame)} tensors compared"]
    if len(ok):
        parts.append(f"mean delta_magnitude {ok['delta_magnitude'].mean():.4g}")
        parts.append(f"mean delta_direction {ok['delta_direction'].mean():.4g}")
    if len(ok) < len(frame):
        parts.append(f"{len(frame) - len(ok)} not analysed (see status)")
    excluded = int(ok["rows_excluded"].sum())  # a non-finite tensor's rows are in its status, not here
    if excluded:
        parts.append(f"{excluded} zero rows excluded")
    for key, label in (("base_only", "only in base"), ("tuned_only", "only in tuned")):
        names = frame.attrs.get(key) or []
        if names:
            parts.append(f"{len(names)} names {label} (e.g. {names[0]})")
    return "; ".join(parts)


def run(args: argparse.Namespace) -> int:
    from dora_analysis.analysis.comparison import compare
    from dora_analysis.views.tables import write_frame

    frame = compare(
        args.base, args.tuned, include=args.include, exclude=args.exclude, progress=True, device=args.device
    )
    write_frame(frame, args.format, args.output, overwrite=args.overwrite)
    # Keep stdout parseable for csv/json: the summary goes to stderr there.
    stream = sys.stdout if args.format == "table" and args.output is None else sys.stderr
    print(summary_line(frame), file=stream)
    return 0
