"""ΔM and ΔD of every checkpoint of one or more training runs: one row per (run, step, tensor).

BASE is the pre-trained checkpoint; each RUN a folder of checkpoint-<step>/ folders (FT weights or
LoRA/DoRA adapters; the method is read from run.json or adapter_config.json) or a single checkpoint.
Each base tensor is read once for the whole series.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dora_analysis.commands.compare import (
        add_device_argument,
        add_metrics_arguments,
        add_output_arguments,
    )

    parser.add_argument("base", help="pre-trained checkpoint (file or folder)")
    parser.add_argument(
        "runs", nargs="+", metavar="RUN", help="run folder (checkpoint-<step>/ inside) or checkpoint"
    )
    add_output_arguments(parser)
    parser.add_argument(
        "--method", help="the method of every run (default: read from run.json / adapter_config.json)"
    )
    parser.add_argument(
        "--include", metavar="REGEX", help="analyse tensors whose name matches (default: 2-D linear weights)"
    )
    parser.add_argument("--exclude", metavar="REGEX", help="skip tensors whose name matches")
    add_device_argument(parser)
    add_metrics_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from dora_analysis.analysis.series import analyze_series
    from dora_analysis.commands.compare import spectrum_options
    from dora_analysis.views.tables import write_frame

    frame = analyze_series(
        args.base,
        args.runs,
        method=args.method,
        include=args.include,
        exclude=args.exclude,
        progress=True,
        device=args.device,
        metrics=args.metrics,
        spectrum=spectrum_options(args),
    )
    shown = (
        frame.drop(columns=["checkpoint"]) if args.format == "table" else frame
    )  # paths make tables unreadable
    write_frame(shown, args.format, args.output, overwrite=args.overwrite)
    stream = sys.stdout if args.format == "table" and args.output is None else sys.stderr
    runs = frame["run"].nunique()
    checkpoints = frame[["run", "step"]].drop_duplicates().shape[0]
    print(
        f"{len(frame)} rows: {runs} runs, {checkpoints} checkpoints, {frame['tensor'].nunique()} tensors",
        file=stream,
    )
    return 0
