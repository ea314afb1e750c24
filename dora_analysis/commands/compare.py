"""Compare a pre-trained checkpoint with a fine-tuned one: ΔM and ΔD per tensor.

BASE is the pre-trained checkpoint (a .safetensors/.bin/.pt file or a Hugging Face folder); TUNED a
fine-tuned checkpoint, a Trainer checkpoint-<step> folder, or a LoRA/DoRA adapter folder over BASE.
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd

__all__ = ["add_arguments", "add_metrics_arguments", "spectrum_options", "run", "summary_line"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", help="pre-trained checkpoint (file or folder)")
    parser.add_argument("tuned", help="fine-tuned checkpoint, checkpoint-<step> folder or adapter folder")
    add_output_arguments(parser)
    parser.add_argument(
        "--include", metavar="REGEX", help="analyse tensors whose name matches (default: 2-D linear weights)"
    )
    parser.add_argument("--exclude", metavar="REGEX", help="skip tensors whose name matches")
    add_device_argument(parser)
    add_metrics_arguments(parser)
    parser.add_argument(
        "--relative",
        action="store_true",
        help="BASE and TUNED are then two fine-tuned checkpoints A and B of one base (--base, else "
        "their run.json's base_model): B's rows against that base, plus subspace_to_reference, the "
        "LoRA paper's subspace similarity of B's and A's updates",
    )
    parser.add_argument("--base", dest="relative_base", metavar="BASE", help="the base of --relative")


def add_metrics_arguments(parser: argparse.ArgumentParser) -> None:
    """``--metrics`` and the spectral options, shared by compare and series."""
    parser.add_argument(
        "--metrics",
        default="decomposition",
        metavar="GROUPS",
        help="comma-separated: decomposition (ΔM/ΔD, always included), spectrum (the update's "
        "singular spectrum), intruders (intruder dimensions); default decomposition",
    )
    parser.add_argument(
        "--intruder-k", type=int, default=10, metavar="K", help="top singular vectors examined (default 10)"
    )
    parser.add_argument(
        "--intruder-eps", type=float, default=0.5, metavar="EPS", help="cosine threshold (default 0.5)"
    )
    parser.add_argument(
        "--svd-rank",
        type=int,
        default=None,
        metavar="Q",
        help="randomised top-Q SVD of dense updates instead of the exact one (large matrices)",
    )


def spectrum_options(args: argparse.Namespace):
    """The :class:`~dora_analysis.analysis.spectrum.SpectrumOptions` of the parsed options."""
    from dora_analysis.analysis.spectrum import SpectrumOptions
    from dora_analysis.errors import InputError

    try:
        return SpectrumOptions(
            intruder_k=args.intruder_k, intruder_eps=args.intruder_eps, svd_rank=args.svd_rank
        )
    except ValueError as error:
        raise InputError.of("--intruder-k/--intruder-eps/--svd-rank", str(error)) from None


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

    base, tuned, reference = args.base, args.tuned, None
    if args.relative:
        base, tuned, reference = _relative_base(args), args.tuned, args.base
    elif args.relative_base:
        from dora_analysis.errors import InputError

        raise InputError.of("--base", "only used with --relative (the base is the first argument)")
    frame = compare(
        base,
        tuned,
        include=args.include,
        exclude=args.exclude,
        progress=True,
        device=args.device,
        metrics=args.metrics,
        spectrum=spectrum_options(args),
        reference=reference,
    )
    write_frame(frame, args.format, args.output, overwrite=args.overwrite)
    # Keep stdout parseable for csv/json: the summary goes to stderr there.
    stream = sys.stdout if args.format == "table" and args.output is None else sys.stderr
    print(summary_line(frame), file=stream)
    return 0


def _relative_base(args: argparse.Namespace) -> str:
    """``--base``, else the one base model A's and B's run.json name."""
    if args.relative_base:
        return args.relative_base
    from dora_analysis.analysis.series import base_of_runs
    from dora_analysis.errors import InputError

    try:
        return str(base_of_runs([args.base, args.tuned]))
    except InputError as error:
        raise InputError(f"{error} (with --relative: pass --base BASE)") from None
