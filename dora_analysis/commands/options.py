"""Every option more than one command takes, defined once, and the checks of option values.

Value checks run while the command line is parsed, before any work: a bad value is one line naming
the option (see :mod:`dora_analysis.commands.main`).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path

from dora_analysis.errors import InputError, first_line

__all__ = [
    "add_device_argument",
    "add_method_argument",
    "add_model_argument",
    "add_output_arguments",
    "add_overwrite_argument",
    "add_quiet_argument",
    "add_seed_argument",
    "add_selection_arguments",
    "add_threads_argument",
    "at_least",
    "device",
    "fraction",
    "output_folder",
    "positive_float",
    "prepare_output",
    "regex",
    "require_module",
    "write_output",
]

DEVICE_TYPES = ("cpu", "cuda", "mps")  # where the analysis can run; meta and others cannot


# ------------------------------------------------------------------------------ value checks


def at_least(minimum: int, maximum: int | None = None):
    """An ``int`` option that must be ``>= minimum`` (and ``<= maximum``)."""

    def check(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {number}")
        if maximum is not None and number > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {number}")
        return number

    check.__name__ = f"int >= {minimum}"
    return check


def _finite(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return number


def positive_float(value: str) -> float:
    """A finite number > 0 (learning rate, alpha)."""
    number = _finite(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return number


def fraction(value: str) -> float:
    """A finite number in [0, 1) (dropout, momentum)."""
    number = _finite(value)
    if not 0 <= number < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return number


def regex(value: str) -> str:
    """A regular expression on tensor names, compiled once here so a typo is caught before any work."""
    try:
        re.compile(value)
    except re.error as error:
        raise argparse.ArgumentTypeError(
            f"not a regular expression: {value!r} ({first_line(error)})"
        ) from None
    return value


def device(value: str) -> str:
    """A torch device this machine has and the analysis can use (``cpu``, ``cuda[:N]``, ``mps``)."""
    from dora_analysis.devices import resolve_device

    resolved = resolve_device(value)
    if resolved.type not in DEVICE_TYPES:
        raise InputError.of(
            "--device", f"{value!r}: the analysis runs on {', '.join(DEVICE_TYPES)} (with an index, cuda:1)"
        )
    return value


def output_folder(value: str) -> Path:
    """A folder to write into: a folder, or absent in a folder that exists (it is created there)."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} exists and is not a folder")
    if not path.parent.is_dir():
        problem = "is a file, not a folder" if path.parent.exists() else "does not exist; create it first"
        raise argparse.ArgumentTypeError(f"{value}: its folder {path.parent} {problem}")
    return path


# ------------------------------------------------------------------------------ shared options


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--format``, ``--output`` and ``--overwrite``, shared by the commands that print a table."""
    from dora_analysis.views.tables import FORMATS

    parser.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="table, csv, json or parquet (default: from --output's extension .txt/.csv/.json/.parquet, else table)",
    )
    parser.add_argument("--output", metavar="FILE", help="write here (atomically) instead of stdout")
    add_overwrite_argument(parser, "replace an existing --output file (a regular file only)")


def add_overwrite_argument(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--overwrite", action="store_true", help=help)


def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    """``--include`` and ``--exclude``: regular expressions on tensor names."""
    parser.add_argument(
        "--include",
        type=regex,
        metavar="REGEX",
        help="analyse tensors whose name matches (default: 2-D linear weights)",
    )
    parser.add_argument("--exclude", type=regex, metavar="REGEX", help="skip tensors whose name matches")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device``, shared by the commands that analyse checkpoints."""
    parser.add_argument(
        "--device",
        type=device,
        metavar="DEVICE",
        help="analyse on this torch device: cpu, cuda, cuda:1, mps (default: CPU)",
    )


def add_cluster_argument(parser: argparse.ArgumentParser) -> None:
    """``--cluster [ADDRESS]``, shared by the commands that analyse checkpoints."""
    parser.add_argument(
        "--cluster",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run on Ray (pip install 'dora-analysis[cluster]'): alone, a local Ray for this command; "
        "'auto' or HOST:PORT joins a running cluster. Paths must be visible to every worker",
    )
    parser.add_argument(
        "--task-mb",
        type=positive_float,
        metavar="MB",
        help="with --cluster: base weights per Ray task (default 64); smaller spreads the SVDs of "
        "--metrics spectrum,intruders over more workers",
    )


def add_layout_argument(parser: argparse.ArgumentParser) -> None:
    """``--layout``, shared by the commands that analyse checkpoints."""
    from dora_analysis.readers.layout import LAYOUT_CHOICES

    parser.add_argument(
        "--layout",
        choices=tuple(LAYOUT_CHOICES),
        default="auto",
        help="which axis holds the output units of every 2-D weight (default auto: the config.json "
        "beside the weights decides, else the tensor names, with a warning where they are a guess)",
    )


def add_per_row_argument(parser: argparse.ArgumentParser) -> None:
    """``--per-row``, shared by compare and series."""
    parser.add_argument(
        "--per-row",
        action="store_true",
        help="one row per output unit (|m - m0| and 1 - cos) instead of one per tensor",
    )


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
        help="randomised top-Q SVD of dense updates instead of the exact one (large matrices); with "
        "intruders at least --intruder-k; rank90 then comes as bounds, effective rank not at all",
    )


def spectrum_options(args: argparse.Namespace):
    """The :class:`~dora_analysis.analysis.spectrum.SpectrumOptions` of the parsed options."""
    from dora_analysis.analysis.spectrum import SpectrumOptions
    from dora_analysis.errors import InputError

    try:
        options = SpectrumOptions(
            intruder_k=args.intruder_k, intruder_eps=args.intruder_eps, svd_rank=args.svd_rank
        )
    except ValueError as error:
        raise InputError.of("--intruder-k/--intruder-eps/--svd-rank", str(error)) from None
    groups = {g.strip().lower() for g in (args.metrics or "").split(",")}
    if args.svd_rank is not None and "intruders" in groups and args.svd_rank < args.intruder_k:
        # the k-th vector can only be certified with computed values below it (the library would
        # raise the rank itself; the CLI says so instead of doing it silently)
        raise InputError.of(
            "--svd-rank",
            f"{args.svd_rank} is below --intruder-k {args.intruder_k}: the intruder count needs the top "
            f"{args.intruder_k} vectors and values below them; use --svd-rank {args.intruder_k} or more",
        )
    return options


def add_job_arguments(parser: argparse.ArgumentParser, name: str, quick: str) -> None:
    """``--out``, ``--quick``, ``--overwrite`` and ``--model`` of the end-to-end jobs (demo, study)."""
    parser.add_argument(
        "--out",
        type=output_folder,
        default=Path(f"dora_{name}"),
        help=f"output folder (default ./dora_{name})",
    )
    parser.add_argument("--quick", action="store_true", help=quick)
    add_overwrite_argument(parser, f"replace the results of an earlier {name} in --out")
    add_model_argument(parser)


def _cluster(args: argparse.Namespace):
    """``--cluster`` as given, or with ``--task-mb`` a Cluster of that task size."""
    if args.task_mb is None:
        return args.cluster
    if args.cluster is None:
        raise InputError.of("--task-mb", "sizes the Ray tasks: use it with --cluster")
    from dataclasses import replace

    from dora_analysis.analysis.cluster import as_cluster

    return replace(as_cluster(args.cluster), group_bytes=max(1, int(args.task_mb * 2**20)))


def analysis_options(args: argparse.Namespace) -> dict:
    """The keyword arguments ``compare`` and ``analyze_series`` take from the shared options."""
    return {
        "include": args.include,
        "exclude": args.exclude,
        "device": args.device,
        "cluster": _cluster(args),
        "layout": args.layout,
        "metrics": args.metrics,
        "spectrum": spectrum_options(args),
    }


def add_method_argument(parser: argparse.ArgumentParser) -> None:
    """``--method`` of every run analysed (series, figures)."""
    parser.add_argument(
        "--method", help="the method of every run (default: read from run.json / adapter_config.json)"
    )


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """``--model PATH``: the pre-trained encoder to train (train, demo)."""
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        metavar="PATH",
        help="local Hugging Face encoder folder (default: the packaged all-MiniLM-L6-v2)",
    )


def add_seed_argument(parser: argparse.ArgumentParser) -> None:
    # torch.manual_seed takes at most 2**64 - 1.
    parser.add_argument("--seed", type=at_least(0, 2**64 - 1), default=0, help="default 0")


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads", type=at_least(1), default=None, help="torch CPU threads (default: torch's)"
    )


def add_quiet_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def require_module(name: str) -> None:
    """Import ``name`` now, so a missing extra is reported before anything is written (see main.py)."""
    importlib.import_module(name)


# ------------------------------------------------------------------------------ writing results


def prepare_output(args: argparse.Namespace, inputs: Iterable[str | os.PathLike]) -> None:
    """Settle ``args.format`` and check ``args.output`` before any work (never after the analysis).

    Raises:
        InputError: a format that conflicts with the extension, or an output that may not be written.
    """
    from dora_analysis.atomic import check_target
    from dora_analysis.views.tables import format_for

    args.format = format_for(args.output, args.format)
    if args.format == "parquet":
        require_module("pyarrow")  # the [parquet] extra: say so before the analysis
    args.inputs = [str(p) for p in inputs]
    if args.output is not None:
        check_target(args.output, args.overwrite, args.inputs, what="--output")


def write_output(frame, args: argparse.Namespace) -> None:
    """Write ``frame`` as :func:`prepare_output` settled, unless the command was interrupted meanwhile."""
    from dora_analysis.commands.interrupts import raise_if_interrupted
    from dora_analysis.views.tables import write_frame

    raise_if_interrupted()
    write_frame(frame, args.format, args.output, overwrite=args.overwrite, inputs=args.inputs)
