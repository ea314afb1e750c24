"""Draw the paper's figures (ΔM vs ΔD per method, per-layer change, training curves) for training runs.

Each RUN is a folder of checkpoint-<step>/ folders (FT weights or LoRA/DoRA adapters). The base is
read from run.json unless --base is given. Prints the correlation table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_arguments", "run"]


def _formats(value: str) -> tuple[str, ...]:
    formats = tuple(part.strip().lower() for part in value.split(",") if part.strip())
    unknown = [f for f in formats if f not in ("png", "pdf", "svg")]
    if not formats or unknown:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of png, pdf, svg; got {value!r}")
    return formats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folder (checkpoint-<step>/ inside)")
    parser.add_argument("--base", help="pre-trained checkpoint (default: run.json's base_model)")
    parser.add_argument("--out", type=Path, default=Path("figures"), help="output folder (default figures/)")
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
    parser.add_argument("--method", help="the method of every run (default: read from the run)")
    parser.add_argument("--overwrite", action="store_true", help="replace figures already in --out")


def run(args: argparse.Namespace) -> int:
    from dora_analysis.analysis.correlation import correlations
    from dora_analysis.analysis.series import analyze_series, training_history
    from dora_analysis.views.figures import write_figures
    from dora_analysis.views.tables import render

    series = analyze_series(args.base, args.runs, method=args.method, progress=True)
    table = correlations(series)
    modules = [m.strip() for m in args.modules.split(",") if m.strip()] if args.modules else None
    written = write_figures(
        series,
        args.out,
        history=training_history(args.runs, method=args.method),
        table=table,
        modules=modules,
        formats=args.formats,
        overwrite=args.overwrite,
    )
    print(render(table, "table"), end="")
    for paths in written.values():
        for path in paths:
            print(f"wrote {path}")
    return 0
