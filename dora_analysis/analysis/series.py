"""ΔM and ΔD across training: one tidy row per (run, step, tensor), and each run's training log.

A *run* is a training output folder holding ``checkpoint-<step>/`` folders (the Hugging Face
Trainer's layout, and :func:`dora_analysis.train`'s), or a single checkpoint. Every
checkpoint of every run is compared with the base in one tensor-major pass
(:func:`~dora_analysis.analysis.comparison.compare_many`), and the base is read through a reader that keeps the
last tensor it returned, so the adapters merged over the base reuse it too: each base tensor is read
once for the whole series (T checkpoints cost about T + 1 reads, not 2T).

Where things come from:

- the method: the ``method`` argument, else the run's ``run.json`` (``"method"``), else the
  checkpoint's ``adapter_config.json`` (``use_dora`` -> ``dora``, else ``lora``), else ``ft``;
- the step: the folder name ``checkpoint-<step>``, else ``trainer_state.json``'s ``global_step``;
- the held-out metric: ``trainer_state.json``'s ``log_history`` entry at that step
  (``eval_accuracy`` where logged, else the first other ``eval_*`` value);
- the base (when ``base`` is None): ``run.json``'s ``base_model``, else (Hugging Face Trainer runs
  write no run.json) an adapter checkpoint's ``adapter_config.json`` ``base_model_name_or_path``, else
  an FT checkpoint's ``config.json`` ``_name_or_path``: a local path or a model id in the local
  Hugging Face cache. All the runs must name the same base.

Rows are ordered by run (as given), step, then stack, layer (a nullable integer) and module. A run
(or checkpoint) given twice is an error, not doubled rows.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch

from dora_analysis.analysis.spectrum import SUBSPACE_COLUMN, SpectrumOptions
from dora_analysis.errors import InputError
from dora_analysis.readers.adapter_config import read_adapter_config
from dora_analysis.readers.base import CheckpointReader, ReaderWrapper
from dora_analysis.readers.json_file import read_json
from dora_analysis.readers.trainer import STATE_FILE, checkpoint_step, trainer_step
from dora_analysis.schema import default_metric

if TYPE_CHECKING:  # only for the annotation: Ray code loads when a cluster is asked for
    from dora_analysis.analysis.cluster import Cluster

__all__ = [
    "SERIES_COLUMNS",
    "Checkpoint",
    "run_checkpoints",
    "run_method",
    "analyze_series",
    "training_history",
    "ReusingReader",
    "base_of_checkpoint",
    "base_of_runs",
]

SERIES_COLUMNS = [
    "run",
    "method",
    "step",
    "stack",
    "layer",
    "module",
    "tensor",
    "delta_magnitude",
    "delta_direction",
    "eval_metric",
    "eval_metric_name",
    "eval_loss",
    "base_magnitude_mean",
    "tuned_magnitude_mean",
    "shape",
    "rows",
    "rows_excluded",
    "status",
    "layout",
    "layout_source",
    "checkpoint",
]

#: φ of each checkpoint's update with its run's final one (``metrics`` with ``spectrum``).
FINAL_COLUMN = "subspace_to_final"

RUN_FILE = "run.json"
ADAPTER_CONFIG = "adapter_config.json"

PathLike = str | os.PathLike
Progress = bool | Callable[[int], None]


@dataclass(frozen=True)
class Checkpoint:
    """One point of a series: which run, which step, which method, and the files."""

    run: str  # the run's label (its folder name)
    run_dir: Path | None  # the folder holding run.json / checkpoint-<step>/, None for a lone checkpoint
    step: int | None
    method: str
    path: Path


# ------------------------------------------------------------------------------------- run layout


def _read_json(path: Path) -> dict | None:
    """The JSON object in ``path`` (None when absent or not an object), read by the readers' one loader."""
    if not path.is_file():
        return None
    value = read_json(path, path.name)
    return value if isinstance(value, dict) else None


def _find_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    from dora_analysis.readers import find_checkpoints

    return list(find_checkpoints(run_dir))


def _step_of(path: Path) -> int | None:
    return trainer_step(path) if path.is_dir() else checkpoint_step(path)


def run_method(checkpoint: Path, run_dir: Path | None = None) -> str:
    """The fine-tuning method of ``checkpoint``: ``run.json``, else ``adapter_config.json``, else ``ft``."""
    for folder in (run_dir, checkpoint.parent if checkpoint.name.startswith("checkpoint-") else None):
        record = _read_json(folder / RUN_FILE) if folder is not None else None
        if record and isinstance(record.get("method"), str):
            return record["method"].lower()
    if checkpoint.is_dir() and (checkpoint / ADAPTER_CONFIG).is_file():  # the readers' one parser
        return (
            "dora"
            if read_adapter_config(checkpoint / ADAPTER_CONFIG, require_rank=False).use_dora
            else "lora"
        )
    return "ft"


def run_checkpoints(runs: PathLike | Sequence[PathLike], method: str | None = None) -> list[Checkpoint]:
    """Every checkpoint of ``runs`` in order (run, then step).

    Args:
        runs: run folders (with ``checkpoint-<step>/`` folders) or single checkpoints.
        method: use this method for every run instead of reading it from the files.
    Raises:
        InputError: a path that does not exist.
    """
    runs = [runs] if isinstance(runs, str | os.PathLike) else list(runs)
    found: list[Checkpoint] = []
    labels = _labels([Path(r) for r in runs])
    for run, label in zip(runs, labels, strict=True):
        path = Path(run)
        if not path.exists():
            raise InputError.of(path, "no such run folder or checkpoint")
        # find_checkpoints also answers for a lone checkpoint folder (itself): that is handled below
        steps = [(s, c) for s, c in _find_checkpoints(path) if c != path] if path.is_dir() else []
        if steps:
            for step, checkpoint in steps:
                found.append(
                    Checkpoint(label, path, step, method or run_method(checkpoint, path), checkpoint)
                )
        else:
            run_dir = (
                path.parent
                if checkpoint_step(path) is not None and (path.parent / RUN_FILE).is_file()
                else None
            )
            found.append(
                Checkpoint(label, run_dir, _step_of(path), method or run_method(path, run_dir), path)
            )
    seen: dict[Path, Path] = {}
    for checkpoint in found:
        key = checkpoint.path.resolve()
        if key in seen:
            raise InputError.of(
                checkpoint.path,
                "given twice (as a run or inside one); each checkpoint may appear once in a series",
            )
        seen[key] = checkpoint.path
    return found


def _labels(paths: list[Path]) -> list[str]:
    """A run's label: its folder's name (a ``checkpoint-<step>`` path belongs to the folder above), or
    the folder path where two different folders share a name."""
    keys = [p.parent if checkpoint_step(p) is not None else p for p in paths]
    names = {k: (k.name or str(k)) for k in keys}
    if len(set(names.values())) < len(names):
        names = {k: str(k) for k in keys}
    return [names[k] for k in keys]


def base_of_checkpoint(checkpoint: Checkpoint) -> str | None:
    """The base model a checkpoint names: ``run.json``'s ``base_model``, else ``adapter_config.json``'s
    ``base_model_name_or_path``, else ``config.json``'s ``_name_or_path`` (None where none does)."""
    record = _read_json(checkpoint.run_dir / RUN_FILE) if checkpoint.run_dir else None
    if record and record.get("base_model"):
        return str(record["base_model"])
    folder = checkpoint.path if checkpoint.path.is_dir() else checkpoint.path.parent
    for file, key in ((ADAPTER_CONFIG, "base_model_name_or_path"), ("config.json", "_name_or_path")):
        value = (_read_json(folder / file) or {}).get(key)
        if isinstance(value, str) and value:
            return value
    return None


def base_of_runs(runs: PathLike | Sequence[PathLike]) -> Path:
    """The one base model the runs' ``run.json`` name.

    Raises:
        InputError: none names one, or they name different bases.
    """
    return _base_from_runs(run_checkpoints(runs))


def _base_from_runs(checkpoints: list[Checkpoint]) -> Path:
    """The one base all ``checkpoints`` name, resolved to a local folder (a path or a cached model id)."""
    from dora_analysis.readers import resolve_model

    bases = {base for base in map(base_of_checkpoint, checkpoints) if base is not None}
    if len(bases) != 1:
        where = checkpoints[0].path if checkpoints else "runs"
        problem = (
            "no run.json, adapter_config.json or config.json names its base model"
            if not bases
            else f"the runs name different bases: {sorted(bases)}"
        )
        raise InputError.of(where, f"{problem}; give the base checkpoint explicitly")
    return resolve_model(bases.pop())


# ------------------------------------------------------------------------------------ metrics, log


def _log_history(checkpoint: Path) -> list[dict]:
    state = _read_json(checkpoint / STATE_FILE) if checkpoint.is_dir() else None
    history = state.get("log_history") if state else None
    return [e for e in history if isinstance(e, dict)] if isinstance(history, list) else []


def _eval_at(checkpoint: Path, step: int | None) -> tuple[str | None, float, float]:
    """``(metric name, metric, eval_loss)`` logged at ``step`` in the checkpoint's trainer state."""
    entries = [e for e in _log_history(checkpoint) if step is not None and e.get("step") == step]
    entries = [e for e in entries if any(k.startswith("eval_") for k in e)]
    name = default_metric(k for e in entries for k in e)
    state = checkpoint / STATE_FILE
    metric = _logged_number(state, entries[-1], name) if name and name in entries[-1] else math.nan
    loss = (
        _logged_number(state, entries[-1], "eval_loss")
        if entries and "eval_loss" in entries[-1]
        else math.nan
    )
    return name, metric, loss


def _logged_number(state: Path, entry: dict, key: str) -> float:
    """``entry[key]`` of a trainer state's log as a float; :class:`InputError` when it is not a number."""
    value = entry[key]
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError.of(
            state,
            f"log_history entry at step {entry.get('step')} has {key} = {str(value)[:40]!r}; expected a number",
        )
    return float(value)


def training_history(runs: PathLike | Sequence[PathLike], method: str | None = None) -> pd.DataFrame:
    """Each run's training log (the last checkpoint's ``log_history``): one row per logged step.

    Returns:
        Columns ``run``, ``method``, ``step`` and every logged value (``loss``, ``eval_accuracy``,
        ``eval_loss``, ``learning_rate``, ...); a step logged twice (training loss, then evaluation)
        becomes one row. Empty when no checkpoint has a ``trainer_state.json``.
    """
    checkpoints = run_checkpoints(runs, method)
    last: dict[str, Checkpoint] = {}
    for checkpoint in checkpoints:
        previous = last.get(checkpoint.run)
        if previous is None or (checkpoint.step or -1) >= (previous.step or -1):
            last[checkpoint.run] = checkpoint
    frames = []
    for checkpoint in last.values():
        entries = [e for e in _log_history(checkpoint.path) if "step" in e]
        if not entries:
            continue
        frame = pd.DataFrame(entries).groupby("step", sort=True).last().reset_index()
        frame.insert(0, "method", checkpoint.method)
        frame.insert(0, "run", checkpoint.run)
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=["run", "method", "step"])
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------------------- series


class ReusingReader(ReaderWrapper):
    """A base reader that keeps the last tensor it returned, so a second ``get`` of the same name
    (an adapter merging over the base right after the comparison read it) costs nothing.

    The comparison is tensor-major, so the last tensor is the one everybody asks for; one tensor is
    held at a time. ``on_new_tensor`` (if given) is called with 1 for every distinct read.
    """

    def __init__(self, reader: CheckpointReader, on_new_tensor: Callable[[int], None] | None = None) -> None:
        super().__init__(reader)
        self._on_new = on_new_tensor
        self._last: tuple[str, torch.Tensor] | None = None

    def get(self, name: str) -> torch.Tensor:
        if self._last is None or self._last[0] != name:
            self._last = None  # drop the previous tensor before reading the next
            self._last = (name, self._reader.get(name))
            if self._on_new is not None:
                self._on_new(1)
        return self._last[1]

    def close(self) -> None:
        self._last = None


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
) -> pd.DataFrame:
    """ΔM and ΔD of every analysed tensor at every checkpoint of every run.

    Args:
        base: the pre-trained checkpoint (path, cached Hugging Face model id, or open reader); None:
            the base the runs name (``run.json``, ``adapter_config.json``, ``config.json``; see the
            module docstring).
        runs: run folders with ``checkpoint-<step>/`` folders, or single checkpoints (FT weights or
            LoRA/DoRA adapter folders over ``base``).
        method: the method of every run (default: read from each run, see the module docstring).
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
    Returns:
        One row per (run, step, tensor), columns :data:`SERIES_COLUMNS`, sorted by run, step, stack,
        layer and module; ``step`` and ``layer`` are nullable integers (``<NA>`` where there is none).
    Raises:
        InputError: a missing run, no checkpoint, or an unusable checkpoint (see the readers).

    Example:
        >>> df = analyze_series(None, ["runs/ft", "runs/lora", "runs/dora"])  # doctest: +SKIP
        >>> df.groupby(["method", "step"])[["delta_magnitude", "delta_direction"]].mean()  # doctest: +SKIP
    """
    from dora_analysis.analysis.comparison import compare_many, parse_metrics

    checkpoints = run_checkpoints(runs, method)
    if not checkpoints:
        raise InputError.of(runs, "no checkpoint found")
    if base is None:
        base = _base_from_runs(checkpoints)
    metric_groups = parse_metrics(metrics)
    spectral = (
        "spectrum" in metric_groups
    )  # φ to the final checkpoint: each run's final update in the same pass
    if cluster is not None and cluster is not False:  # compare_many hands it to Ray: one pass, all steps
        paths = [c.path for c in checkpoints]
        frames = compare_many(
            base,
            paths,
            include,
            exclude,
            progress,
            device,
            cluster,
            layout=layout,
            metrics=metrics,
            spectrum=spectrum,
            references=_finals(checkpoints) if spectral else None,
        )
        return _assembled_with_metrics(checkpoints, frames, metric_groups)
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
        for group in [checkpoints] if spectral else _memory_groups(checkpoints):
            reusing = ReusingReader(reader, on_new)
            frames += compare_many(
                reusing,
                [c.path for c in group],
                include=include,
                exclude=exclude,
                progress=progress is True,
                device=device,
                layout=layout,
                metrics=metrics,
                spectrum=spectrum,
                references=_finals(group) if spectral else None,
            )
    finally:
        if owned is not None:
            owned.close()
    return _assembled_with_metrics(checkpoints, frames, metric_groups)


def _assembled_with_metrics(
    checkpoints: list[Checkpoint], frames: list[pd.DataFrame], groups: tuple[str, ...]
) -> pd.DataFrame:
    """:func:`_assemble` with the metric groups' columns, φ's named ``subspace_to_final``."""
    from dora_analysis.analysis.comparison import metric_columns

    extra = metric_columns(groups, reference="spectrum" in groups)
    frames = [f.rename(columns={SUBSPACE_COLUMN: FINAL_COLUMN}) for f in frames]
    return _assemble(checkpoints, frames, [FINAL_COLUMN if c == SUBSPACE_COLUMN else c for c in extra])


#: Bytes of loaded-whole checkpoint files one pass of a series may hold at once.
RESIDENT_BYTES = 1 << 30


def _memory_groups(checkpoints: list[Checkpoint]) -> list[list[Checkpoint]]:
    """``checkpoints`` in consecutive groups, each holding at most :data:`RESIDENT_BYTES` of files that
    are read into memory whole (non-zip pickles); memory-mapped formats cost nothing here."""
    groups: list[list[Checkpoint]] = [[]]
    held = 0
    for checkpoint in checkpoints:
        size = _resident_bytes(checkpoint.path)
        if groups[-1] and held + size > RESIDENT_BYTES:
            groups.append([])
            held = 0
        groups[-1].append(checkpoint)
        held += size
    return groups


def _resident_bytes(path: Path) -> int:
    import zipfile

    from dora_analysis.readers._common import is_training_state_file

    files = [path] if path.is_file() else [p for p in path.iterdir() if p.is_file()]
    return sum(
        p.stat().st_size
        for p in files
        if p.suffix.lower() in (".bin", ".pt", ".pth")
        and not is_training_state_file(p)
        and not zipfile.is_zipfile(p)
    )


def _finals(checkpoints: list[Checkpoint]) -> list[int]:
    """Per checkpoint, the index of its run's final (highest-step) checkpoint (itself when unnumbered)."""
    last: dict[str, int] = {}
    for index, c in enumerate(checkpoints):
        if c.step is None:
            continue
        best = last.get(c.run)
        if best is None or c.step >= checkpoints[best].step:
            last[c.run] = index
    return [last.get(c.run, index) if c.step is not None else index for index, c in enumerate(checkpoints)]


def _assemble(
    checkpoints: list[Checkpoint], frames: list[pd.DataFrame], extra: Sequence[str] = ()
) -> pd.DataFrame:
    parts = []
    for checkpoint, frame in zip(checkpoints, frames, strict=True):
        name, metric, loss = _eval_at(checkpoint.path, checkpoint.step)
        parts.append(
            frame.assign(
                run=checkpoint.run,
                method=checkpoint.method,
                step=checkpoint.step,
                eval_metric=metric,
                eval_metric_name=name,
                eval_loss=loss,
                checkpoint=str(checkpoint.path),
            )
        )
    from dora_analysis.analysis.comparison import sort_rows

    columns = SERIES_COLUMNS + list(extra)
    df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    df["step"] = df["step"].astype("Int64")
    df = sort_rows(df, first=["run", "step"])
    if frames:
        df.attrs["layout_rule"] = frames[0].attrs.get("layout_rule")
        df.attrs["layout_ambiguous"] = sorted(
            {n for f in frames for n in f.attrs.get("layout_ambiguous", [])}
        )
    return df[columns]
