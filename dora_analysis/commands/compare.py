"""Compare a pre-trained checkpoint with a fine-tuned one: ΔM and ΔD per tensor.

BASE is the pre-trained checkpoint (a .safetensors/.bin/.pt file, a Hugging Face folder, or a model id
in the local Hugging Face cache); TUNED a fine-tuned checkpoint, a Trainer checkpoint-<step> folder, or
a LoRA/DoRA adapter folder over BASE. `compare ADAPTER` alone uses the base the adapter names.
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd

__all__ = ["add_arguments", "run", "summary_line"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", help="pre-trained checkpoint (file, folder or cached model id)")
    parser.add_argument(
        "tuned",
        nargs="?",
        help="fine-tuned checkpoint, checkpoint-<step> folder or adapter folder "
        "(omitted: BASE is an adapter and its base_model_name_or_path is the base)",
    )
    add_output_arguments(parser)
    parser.add_argument(
        "--per-row",
        action="store_true",
        help="one row per output unit (|m - m0| and 1 - cos) instead of one per tensor",
    )
    add_layout_argument(parser)
    parser.add_argument(
        "--include", metavar="REGEX", help="analyse tensors whose name matches (default: 2-D linear weights)"
    )
    parser.add_argument("--exclude", metavar="REGEX", help="skip tensors whose name matches")
    add_device_argument(parser)


def add_layout_argument(parser: argparse.ArgumentParser) -> None:
    """``--layout``, shared by the commands that analyse checkpoints."""
    from dora_analysis.readers.layout import LAYOUT_CHOICES

    parser.add_argument(
        "--layout",
        choices=tuple(LAYOUT_CHOICES),
        default="auto",
        help="which axis holds the output units of every 2-D weight (default auto: the config.json "
        "beside the weights decides, else the tensor names, with a warning where they are a guess)",
    )


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
    excluded = int(frame["rows_excluded"].sum()) if len(frame) else 0
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

    base, tuned = (args.base, args.tuned) if args.tuned is not None else (None, args.base)
    frame = compare(
        base,
        tuned,
        include=args.include,
        exclude=args.exclude,
        progress=True,
        device=args.device,
        layout=args.layout,
        per_row=args.per_row,
    )
    write_frame(frame, args.format, args.output, overwrite=args.overwrite)
    if args.per_row:
        stream = sys.stdout if args.format == "table" and args.output is None else sys.stderr
        print(f"{len(frame)} rows of {frame['tensor'].nunique()} tensors", file=stream)
        return 0
    # Keep stdout parseable for csv/json: the summary goes to stderr there.
    stream = sys.stdout if args.format == "table" and args.output is None else sys.stderr
    print(summary_line(frame), file=stream)
    return 0
