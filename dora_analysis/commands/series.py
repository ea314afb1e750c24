"""ΔM and ΔD of every checkpoint of one or more training runs: one row per (run, step, tensor), or
with --per-row one per output unit.

BASE is the pre-trained checkpoint; each RUN a folder of checkpoint-<step>/ folders (FT weights or
LoRA/DoRA adapters; the method is read from run.json or adapter_config.json) or a single checkpoint.
Each base tensor is read once for the whole series.
"""

from __future__ import annotations

import argparse
import sys

from dora_analysis.commands.options import (
    add_cluster_argument,
    add_device_argument,
    add_layout_argument,
    add_method_argument,
    add_metrics_arguments,
    add_output_arguments,
    add_per_row_argument,
    add_selection_arguments,
    analysis_options,
    prepare_output,
    write_output,
)

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", help="pre-trained checkpoint (file or folder)")
    parser.add_argument(
        "runs", nargs="+", metavar="RUN", help="run folder (checkpoint-<step>/ inside) or checkpoint"
    )
    add_output_arguments(parser)
    add_per_row_argument(parser)
    add_method_argument(parser)
    add_selection_arguments(parser)
    add_device_argument(parser)
    add_layout_argument(parser)
    add_cluster_argument(parser)
    add_metrics_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from dora_analysis.analysis.series import analyze_series

    prepare_output(args, [args.base, *args.runs])
    options = analysis_options(args)
    frame = analyze_series(
        args.base, args.runs, method=args.method, progress=True, per_row=args.per_row, **options
    )
    shown = (
        frame.drop(columns=["checkpoint"]) if args.format == "table" else frame
    )  # paths make tables unreadable
    write_output(shown, args)
    stream = sys.stdout if args.format == "table" and args.output is None else sys.stderr
    runs = frame["run"].nunique()
    checkpoints = frame[["run", "step"]].drop_duplicates().shape[0]
    unit = "output-unit rows" if args.per_row else "rows"
    print(
        f"{len(frame)} {unit}: {runs} runs, {checkpoints} checkpoints, {frame['tensor'].nunique()} tensors",
        file=stream,
    )
    return 0
