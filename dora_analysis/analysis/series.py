"""ΔM and ΔD across training: one tidy row per (run, step, tensor).

Every checkpoint of every run (found by :mod:`dora_analysis.readers.runs`, which also says where
each run's method, step, held-out metric and base come from) is compared with the base in one
tensor-major pass (:func:`~dora_analysis.analysis.comparison.compare_many`), and the base is read
through a reader that keeps the last tensor it returned, so the adapters merged over the base reuse
it too: each base tensor is read once for the whole series (T checkpoints cost about T + 1 reads,
not 2T).

Rows are ordered by run (as given), step, then stack, layer (a nullable integer) and module. A run
(or checkpoint) given twice is an error, not doubled rows.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import torch

from dora_analysis.analysis.cluster import Cluster
from dora_analysis.analysis.comparison import compare_many
from dora_analysis.analysis.spectrum import SpectrumOptions
from dora_analysis.errors import InputError
from dora_analysis.readers.base import CheckpointReader
from dora_analysis.readers.reuse import ReusingReader
from dora_analysis.readers.runs import (
    Checkpoint,
    base_of_runs,
    eval_at,
    final_indices,
    memory_groups,
    run_checkpoints,
)
from dora_analysis.schema import (
    FINAL_COLUMN,
    SERIES_COLUMNS,
    SERIES_PER_ROW_COLUMNS,
    SUBSPACE_COLUMN,
    metric_columns,
    parse_metrics,
    sort_rows,
)

__all__ = ["analyze_series"]

PathLike = str | os.PathLike
Progress = bool | Callable[[int], None]


def analyze_series(
    base: PathLike | CheckpointReader | None,
    runs: PathLike | Sequence[PathLike],
    method: str | None = None,
    include: str | None = None,
    exclude: str | None = None,
    progress: Progress = False,
    device: str | torch.device | None = None,
    cluster: Cluster | str | bool | None = None,
    *,
    layout: str | None = None,
    metrics: str | Sequence[str] | None = None,
    spectrum: SpectrumOptions | None = None,
    per_row: bool = False,
) -> pd.DataFrame:
    """ΔM and ΔD of every analysed tensor at every checkpoint of every run.

    Args:
        base: the pre-trained checkpoint (path, cached Hugging Face model id, or open reader); None:
            the base the runs name (``run.json``, ``adapter_config.json``, ``config.json``; see
            :mod:`dora_analysis.readers.runs`).
        runs: run folders with ``checkpoint-<step>/`` folders, or single checkpoints (FT weights or
            LoRA/DoRA adapter folders over ``base``).
        method: the method of every run (default: read from each run, see :mod:`dora_analysis.readers.runs`).
        include, exclude: regular expressions on tensor names (default: 2-D linear weights).
        progress: True for a bar on stderr, or a callable given 1 per base tensor done.
        device: where the tensors are analysed (e.g. ``"cuda"``); default: where the readers put them.
        cluster: run on Ray (``True``: a local Ray for the call; ``"auto"``/``"HOST:PORT"``: join a
            cluster; see :mod:`dora_analysis.analysis.cluster`); the same frame, bit for bit.
        metrics: metric groups (``"decomposition,spectrum,intruders"``; see
            :func:`~dora_analysis.analysis.comparison.compare_many`). With ``spectrum``, also
            ``subspace_to_final``: φ of each checkpoint's update with its run's final (highest-step)
            checkpoint's update (1 at the final step; NaN for a zero update).
        spectrum: options of the spectral columns (:class:`~dora_analysis.analysis.spectrum.SpectrumOptions`).
        layout: force every 2-D weight's layout (see :func:`~dora_analysis.analysis.comparison.compare_many`).
        per_row: one row per output unit of every tensor at every checkpoint (columns
            :data:`~dora_analysis.schema.SERIES_PER_ROW_COLUMNS`: ``delta_magnitude`` is that row's
            ``|m - m0|``, ``delta_direction`` its ``1 - cos``), the rows the paper's gradient argument
            is about; in one process, with the decomposition only.
    Returns:
        One row per (run, step, tensor), columns :data:`~dora_analysis.schema.SERIES_COLUMNS`, sorted by run, step, stack,
        layer and module; ``step`` and ``layer`` are nullable integers (``<NA>`` where there is none).
    Raises:
        InputError: a missing run, no checkpoint, or an unusable checkpoint (see the readers).

    Example:
        >>> df = analyze_series(None, ["runs/ft", "runs/lora", "runs/dora"])  # doctest: +SKIP
        >>> df.groupby(["method", "step"])[["delta_magnitude", "delta_direction"]].mean()  # doctest: +SKIP
    """
    checkpoints = run_checkpoints(runs, method)
    if not checkpoints:
        raise InputError.of(runs, "no checkpoint found")
    if base is None:
        base = base_of_runs(checkpoints)
    groups = parse_metrics(metrics)
    if per_row and groups != ("decomposition",):
        raise InputError.of("--per-row", "gives the decomposition only: drop --metrics spectrum/intruders")
    spectral = "spectrum" in groups  # φ to the final checkpoint: each run's final update in the same pass
    options = {"layout": layout, "metrics": metrics, "spectrum": spectrum, "per_row": per_row}
    if cluster is not None and cluster is not False:  # compare_many hands it to Ray: one pass, all steps
        paths = [c.path for c in checkpoints]
        finals = final_indices(checkpoints) if spectral else None
        frames = compare_many(
            base, paths, include, exclude, progress, device, cluster, references=finals, **options
        )
        return _assembled(checkpoints, frames, groups, per_row)
    on_new = progress if callable(progress) else None
    owned = None
    if isinstance(base, CheckpointReader):
        reader = base
    else:
        from dora_analysis.readers import open_checkpoint

        reader = owned = open_checkpoint(Path(base))
    frames: list[pd.DataFrame] = []
    try:
        # Checkpoints whose files cannot be memory-mapped (old non-zip pickles) are loaded whole:
        # compare them in groups so that only one group's copies are in memory at a time; with φ to
        # the final checkpoint, one group.
        for group in [checkpoints] if spectral else memory_groups(checkpoints):
            frames += compare_many(
                ReusingReader(reader, on_new),
                [c.path for c in group],
                include=include,
                exclude=exclude,
                progress=progress is True,
                device=device,
                references=final_indices(group) if spectral else None,
                **options,
            )
    finally:
        if owned is not None:
            owned.close()
    return _assembled(checkpoints, frames, groups, per_row)


def _assembled(
    checkpoints: list[Checkpoint], frames: list[pd.DataFrame], groups: tuple[str, ...], per_row: bool = False
) -> pd.DataFrame:
    """The series frame: each checkpoint's frame with its run, method, step and held-out metric,
    the metric groups' columns after :data:`~dora_analysis.schema.SERIES_COLUMNS` (φ named
    ``subspace_to_final``); with ``per_row``, :data:`~dora_analysis.schema.SERIES_PER_ROW_COLUMNS`."""
    extra = [
        FINAL_COLUMN if c == SUBSPACE_COLUMN else c for c in metric_columns(groups, "spectrum" in groups)
    ]
    parts = []
    for checkpoint, frame in zip(checkpoints, frames, strict=True):
        about = {"run": checkpoint.run, "method": checkpoint.method, "step": checkpoint.step}
        if not per_row:
            name, metric, loss = eval_at(checkpoint.path, checkpoint.step)
            about.update(eval_metric=metric, eval_metric_name=name, eval_loss=loss)
        about["checkpoint"] = str(checkpoint.path)
        parts.append(frame.rename(columns={SUBSPACE_COLUMN: FINAL_COLUMN}).assign(**about))
    columns = SERIES_PER_ROW_COLUMNS if per_row else SERIES_COLUMNS + extra
    df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    df["step"] = df["step"].astype("Int64")
    # a stable sort: per row, each tensor's rows keep their order
    df = sort_rows(df, first=["run", "step"])
    if frames:
        df.attrs["layout_rule"] = frames[0].attrs.get("layout_rule")
        df.attrs["layout_ambiguous"] = sorted(
            {n for f in frames for n in f.attrs.get("layout_ambiguous", [])}
        )
    return df[columns]
