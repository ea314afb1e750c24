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
    add_metrics_arguments,
    add_output_arguments,
    add_per_row_argument,
    add_selection_arguments,
    analysis_options,
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
    add_per_row_argument(parser)
    add_layout_argument(parser)
    add_selection_arguments(parser)
    add_device_argument(parser)
    add_cluster_argument(parser)
    add_metrics_arguments(parser)
    parser.add_argument(
        "--relative",
        action="store_true",
        help="BASE and TUNED are then two fine-tuned checkpoints A and B of one base (--base, else "
        "their run.json's base_model): B's rows against that base, plus subspace_to_reference, the "
        "LoRA paper's subspace similarity of B's and A's updates",
    )
    parser.add_argument("--base", dest="relative_base", metavar="BASE", help="the base of --relative")


def summary_line(frame: pd.DataFrame) -> str:
    """One line: how many tensors, the mean ΔM and ΔD, and what was left out."""
    ok = frame[frame["status"] == "ok"]
    parts = [f"{len(frame)} tensors compared"]
    if len(ok):
        parts.append(f"mean delta_magnitude {ok['delta_magnitude'].mean():.4g}")
        parts.append(f"mean delta_direction {ok['delta_direction'].mean():.4g}")
    if len(ok) < len(frame):
        parts.append(f"{len(frame) - len(ok)} not analysed (see status)")
    excluded = int(ok["rows_excluded"].sum())  # a non-finite tensor's rows are in its status, not here
    if excluded:
        parts.append(f"{excluded} zero rows excluded")
    for key, label in (("base_only", "only in base"), ("tuned_only", "only in tuned")):
        names = frame.attrs.get(key) or []
        if names:
            parts.append(f"{len(names)} names {label} (e.g. {names[0]})")
    return "; ".join(parts)


def run(args: argparse.Namespace) -> int:
    from dora_analysis.analysis.comparison import compare
    from dora_analysis.errors import InputError

    prepare_output(args, [p for p in (args.base, args.tuned, args.relative_base) if p is not None])
    base, tuned, reference = args.base, args.tuned, None
    if args.relative:
        if args.tuned is None:
            raise InputError.of("--relative", "needs two fine-tuned checkpoints: compare A B --relative")
        base, tuned, reference = _relative_base(args), args.tuned, args.base
    elif args.relative_base:
        raise InputError.of("--base", "only used with --relative (the base is the first argument)")
    elif args.tuned is None:  # an adapter alone: its adapter_config.json names the base
        base, tuned = None, args.base
    frame = compare(
        base, tuned, progress=True, per_row=args.per_row, reference=reference, **analysis_options(args)
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


def _relative_base(args: argparse.Namespace) -> str:
    """``--base``, else the one base model A's and B's run.json name."""
    if args.relative_base:
        return args.relative_base
    from dora_analysis.errors import InputError
    from dora_analysis.readers.runs import base_of_runs

    try:
        return str(base_of_runs([args.base, args.tuned]))
    except InputError as error:
        raise InputError(f"{error} (with --relative: pass --base BASE)") from None
