"""Draw the paper's figures (ΔM vs ΔD per method, per-layer change, training curves) for training runs.

Each RUN is a folder of checkpoint-<step>/ folders (FT weights or LoRA/DoRA adapters). The base is
read from run.json unless --base is given. Prints the correlation table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dora_analysis.commands.options import add_method_argument, add_overwrite_argument, output_folder
from dora_analysis.errors import InputError

__all__ = ["add_arguments", "run"]

_NO_BASE = "give the base checkpoint explicitly"  # the end of analyze_series' message when no run names it


def _formats(value: str) -> tuple[str, ...]:
    formats = tuple(part.strip().lower() for part in value.split(",") if part.strip())
    unknown = [f for f in formats if f not in ("png", "pdf", "svg")]
    if not formats or unknown:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of png, pdf, svg; got {value!r}")
    return formats


def _tracked(paths: list[Path], method: str | None):
    """The tracked frames in ``paths`` as one series (``method`` replaces their method column)."""
    import pandas as pd

    from dora_analysis.tracking.output import read_tracked

    series = pd.concat([read_tracked(p) for p in paths], ignore_index=True)
    return series.assign(method=method) if method else series


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="run folder (checkpoint-<step>/ inside), or a tracked deltas.csv/.parquet (train --track-every)",
    )
    parser.add_argument("--base", help="pre-trained checkpoint (default: run.json's base_model)")
    parser.add_argument(
        "--out", type=output_folder, default=Path("figures"), help="output folder (default figures/)"
    )
    parser.add_argument(
        "--formats",
        type=_formats,
        default=("png", "pdf"),
        metavar="LIST",
        help="comma-separated file types (default png,pdf)",
    )
    parser.add_argument(
        "--modules", metavar="NAMES", help="comma-separated modules to draw (default query,value)"
    )
    add_method_argument(parser)
    add_overwrite_argument(parser, "replace figures already in --out")


def run(args: argparse.Namespace) -> int:
    from dora_analysis.analysis.correlation import correlations
    from dora_analysis.analysis.series import analyze_series
    from dora_analysis.readers.runs import training_history
    from dora_analysis.schema import module_mask, points
    from dora_analysis.views.figures import write_figures
    from dora_analysis.views.tables import render

    tracked = [Path(r) for r in args.runs if Path(r).suffix.lower() in (".csv", ".parquet")]
    if tracked and len(tracked) != len(args.runs):
        raise InputError.of(tracked[0], "give either tracked frames (.csv/.parquet) or run folders, not both")
    try:
        if tracked:
            series = _tracked(tracked, args.method)
        else:
            series = analyze_series(args.base, args.runs, method=args.method, progress=True)
    except InputError as error:
        if args.base is None and str(error).endswith(_NO_BASE):  # name the option that gives it
            raise InputError(
                f"{str(error).removesuffix(_NO_BASE)}give the base checkpoint with --base"
            ) from None
        raise
    table = correlations(series)
    modules = [m.strip() for m in args.modules.split(",") if m.strip()] if args.modules else None
    present = points(series)["module"]
    missing = [m for m in modules or () if not module_mask(present, m).any()]  # short names select paths
    if missing:
        raise InputError.of(
            "--modules",
            f"{missing[0]!r} has no analysed points; the series has {', '.join(sorted(set(present)))}",
        )
    args.out.mkdir(exist_ok=True)  # after the analysis: a failed one leaves no empty folder
    written = write_figures(
        series,
        args.out,
        history=None if tracked else training_history(args.runs, method=args.method),
        table=table,
        modules=modules,
        formats=args.formats,
        overwrite=args.overwrite,
    )
    if tracked:  # dense steps: each layer's path as well
        from dora_analysis.views.trajectories import write_trajectories

        written.update(write_trajectories(series, args.out, modules, args.formats, overwrite=args.overwrite))
    print(render(table, "table"), end="")
    for paths in written.values():
        for path in paths:
            print(f"wrote {path}")
    return 0
