"""Compare a pre-trained checkpoint with a fine-tuned one: ΔM and ΔD per tensor.

BASE is the pre-trained checkpoint (a .safetensors/.bin/.pt file, a Hugging Face folder, or a model id
in the local Hugging Face cache); TUNED a fine-tuned checkpoint, a Trainer checkpoint-<step> folder, or
a LoRA/DoRA adapter folder over BASE. `compare ADAPTER` alone uses the base the adapter names.
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd

from dora_analysis.commands.options import (
    add_cluster_argument,
    add_device_argument,
    add_layout_argument,
    add_output_arguments,
    add_selection_arguments,
    prepare_output,
    write_output,
)

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
    add_selection_arguments(parser)
    add_device_argument(parser)
    add_cluster_argument(parser)


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

    prepare_output(args, [p for p in (args.base, args.tuned) if p is not None])
    base, tuned = (args.base, args.tuned) if args.tuned is not None else (None, args.base)
    frame = compare(
        base,
        tuned,
        include=args.include,
        exclude=args.exclude,
        progress=True,
        device=args.device,
        cluster=args.cluster,
        layout=args.layout,
        per_row=args.per_row,
    )
    write_output(frame, args)
    if args.per_row:
        stream = sys.stdout if args.format == "table" and args.output is None else sys.stderr
        print(f"{len(frame)} rows of {frame['tensor'].nunique()} tensors", file=stream)
        return 0
    # Keep stdout parseable for csv/json: the summary goes to stderr there.
    stream = sys.stdout if args.format == "table" and args.output is None else sys.stderr
    print(summary_line(frame), file=stream)
    return 0
