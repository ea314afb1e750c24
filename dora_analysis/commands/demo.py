"""The main job: train FT, LoRA and DoRA on the default model and task, analyse, draw, and write report.md.

Writes OUT/runs/, OUT/series.csv, OUT/correlations.csv, OUT/figures/ and OUT/report.md. About 6
minutes on 2 CPU cores; --quick runs in about a minute (fewer steps, examples and tokens).
"""

from __future__ import annotations

import argparse

from dora_analysis.commands.options import (
    add_job_arguments,
    add_quiet_argument,
    add_seed_argument,
    add_threads_argument,
    at_least,
    require_module,
)

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_job_arguments(parser, "demo", "a run of about a minute, to try things out")
    parser.add_argument(
        "--steps", type=at_least(1), default=None, help="optimizer steps per method (default 100; quick 24)"
    )
    parser.add_argument(
        "--save-every",
        type=at_least(1),
        default=None,
        metavar="K",
        help="checkpoint every K steps (default: four checkpoints per run)",
    )
    add_seed_argument(parser)
    add_threads_argument(parser)
    parser.add_argument(
        "--reuse-runs",
        action="store_true",
        help="analyse the completed runs already in OUT/runs instead of training again",
    )
    add_quiet_argument(parser)


def run(args: argparse.Namespace) -> int:
    require_module("transformers")  # the [train] extra: say so before OUT is touched
    from dora_analysis.commands.interrupts import raise_if_interrupted
    from dora_analysis.jobs.demo import DemoConfig, demo_summary, run_demo

    result = run_demo(
        DemoConfig(
            out=args.out,
            quick=args.quick,
            overwrite=args.overwrite,
            model=args.model,
            steps=args.steps,
            save_every=args.save_every,
            seed=args.seed,
            threads=args.threads,
            reuse_runs=args.reuse_runs,
        ),
        progress=not args.quiet,
        check_interrupt=raise_if_interrupted,
    )
    print("\n".join(demo_summary(result)))
    return 0
