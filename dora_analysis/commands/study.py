"""When does the paper's sign appear? Train a grid of FT/LoRA/DoRA runs and measure r every way.

Writes OUT/study.csv, OUT/points.csv, OUT/figures/sign_map_*.png and OUT/report.md; the runs go to
OUT/runs/ and are reused when the study is run again (an interrupted study resumes). --quick trains
a small grid of short runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dora_analysis.commands.train import add_model_argument

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path("dora_study"), help="output folder (default ./dora_study)"
    )
    parser.add_argument("--quick", action="store_true", help="a small grid of short runs, to try it")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the results of an earlier study in --out"
    )
    add_model_argument(parser)
    parser.add_argument("--device", default=None, help="where the analysis runs, e.g. cuda (default: cpu)")
    parser.add_argument(
        "--seeds", type=int, default=None, metavar="N", help="seeds per configuration (default 3; quick 2)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads while training")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from dora_analysis.commands.study_pipeline import StudyConfig, run_study
    from dora_analysis.errors import InputError

    if args.seeds is not None and args.seeds < 1:
        raise InputError.of("--seeds", f"must be at least 1, got {args.seeds}")
    table = run_study(
        StudyConfig(
            out=args.out,
            quick=args.quick,
            overwrite=args.overwrite,
            model=args.model,
            device=args.device,
            seeds=tuple(range(args.seeds)) if args.seeds else None,
            threads=args.threads,
        ),
        progress=not args.quiet,
    )
    base = table[(table["cell"] == "base") & (table["window"] == "paper") & (table["convention"] == "paper")]
    for row in base[base["module"] == "query"].itertuples(index=False):
        print(
            f"{row.method:>5}: query r = {row.r:+.2f} [{row.r_low:+.2f}, {row.r_high:+.2f}] (base configuration)"
        )
    print(f"report: {args.out / 'report.md'}")
    return 0
