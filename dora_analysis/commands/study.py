"""When does the paper's sign appear? Train a grid of FT/LoRA/DoRA runs and measure r every way.

Writes OUT/study.csv, OUT/points.csv, OUT/figures/sign_map_*.png and OUT/report.md; the runs go to
OUT/runs/ and are reused when the study is run again (an interrupted study resumes). --quick trains
a small grid of short runs.
"""

from __future__ import annotations

import argparse

from dora_analysis.commands.options import (
    add_job_arguments,
    add_quiet_argument,
    add_threads_argument,
    at_least,
    require_module,
)

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_job_arguments(parser, "study", "a small grid of short runs, to try it")
    parser.add_argument(
        "--device", default=None, help="train and analyse on this torch device, e.g. cuda (default: cpu)"
    )
    parser.add_argument(
        "--seeds",
        type=at_least(1),
        default=None,
        metavar="N",
        help="seeds per configuration (default 3; quick 2)",
    )
    add_threads_argument(parser)
    add_quiet_argument(parser)


def run(args: argparse.Namespace) -> int:
    require_module("transformers")  # the [train] extra: say so before anything is written
    from dora_analysis.jobs.study import StudyConfig, run_study, study_summary

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
    print("\n".join(study_summary(table, args.out)))
    return 0
