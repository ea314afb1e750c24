"""Training runs on disk: their checkpoints, methods, steps, logs and the base model they name.

A *run* is a training output folder holding ``checkpoint-<step>/`` folders (the Hugging Face
Trainer's layout, and :func:`dora_analysis.train`'s), or a single checkpoint. Where things come from:

- the method: the ``method`` argument, else the run's ``run.json`` (``"method"``), else the
  checkpoint's ``adapter_config.json`` (``use_dora`` -> ``dora``, else ``lora``), else ``ft``;
- the step: the folder name ``checkpoint-<step>``, else ``trainer_state.json``'s ``global_step``;
- the held-out metric: ``trainer_state.json``'s ``log_history`` entry at that step
  (``eval_accuracy`` where logged, else the first other ``eval_*`` value);
- the base: ``run.json``'s ``base_model``, else (Hugging Face Trainer runs write no run.json) an
  adapter checkpoint's ``adapter_config.json`` ``base_model_name_or_path``, else an FT checkpoint's
  ``config.json`` ``_name_or_path`` (:func:`named_base`, the one place this is decided).

Every field read is type-checked: a wrong type is one :class:`InputError` line naming the file and
the field, never a silent fallback.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dora_analysis.errors import InputError
from dora_analysis.readers._common import is_training_state_file
from dora_analysis.readers.adapter_config import read_adapter_config
from dora_analysis.readers.json_file import json_field, read_json_object
from dora_analysis.readers.trainer import (
    STATE_FILE,
    checkpoint_step,
    find_checkpoints,
    read_trainer_state,
    trainer_step,
)
from dora_analysis.schema import default_metric

__all__ = [
    "RUN_FILE",
    "ADAPTER_CONFIG",
    "RESIDENT_BYTES",
    "Checkpoint",
    "read_run_record",
    "run_method",
    "run_checkpoints",
    "named_base",
    "base_of_runs",
    "eval_at",
    "training_history",
    "memory_groups",
    "final_indices",
]

RUN_FILE = "run.json"
ADAPTER_CONFIG = "adapter_config.json"
#: Bytes of loaded-whole checkpoint files one pass of a series may hold at once.
RESIDENT_BYTES = 1 << 30

PathLike = str | os.PathLike


@dataclass(frozen=True)
class Checkpoint:
    """One point of a series: which run, which step, which method, and the files."""

    run: str  # the run's label (its folder name)
    run_dir: Path | None  # the folder holding run.json / checkpoint-<step>/, None for a lone checkpoint
    step: int | None
    method: str
    path: Path


# ------------------------------------------------------------------------------------------ files


def read_run_record(run: PathLike) -> dict:
    """``RUN_DIR/run.json`` through the bounded JSON loader; ``{}`` when it is missing or unreadable
    (callers treat such a run as one to train again)."""
    try:
        return read_json_object(Path(run) / RUN_FILE, RUN_FILE)
    except (OSError, InputError):
        return {}


def _json_object(path: Path) -> dict | None:
    """The JSON object in ``path``; None when absent. A file that is not an object is an error."""
    if not path.is_file():
        return None
    return read_json_object(path, path.name)


def _text_field(path: Path, record: dict | None, key: str) -> str | None:
    """``record[key]`` of the file ``path``: a non-empty string, None when absent, null or empty.

    Raises:
        InputError: present with another type (``"method": 5``), one line naming file and field.
    """
    return json_field(path, record or {}, key, str) or None


# ------------------------------------------------------------------------------------ run layout


def run_method(checkpoint: Path, run_dir: Path | None = None) -> str:
    """The fine-tuning method of ``checkpoint``: ``run.json``, else ``adapter_config.json``, else ``ft``."""
    for folder in (run_dir, checkpoint.parent if checkpoint.name.startswith("checkpoint-") else None):
        if folder is None:
            continue
        method = _text_field(folder / RUN_FILE, _json_object(folder / RUN_FILE), "method")
        if method is not None:
            return method.lower()
    if checkpoint.is_dir() and (checkpoint / ADAPTER_CONFIG).is_file():  # the readers' one parser
        config = read_adapter_config(checkpoint / ADAPTER_CONFIG, require_rank=False)
        return "dora" if config.use_dora else "lora"
    return "ft"


def run_checkpoints(runs: PathLike | Sequence[PathLike], method: str | None = None) -> list[Checkpoint]:
    """Every checkpoint of ``runs`` in order (run, then step).

    Args:
        runs: run folders (with ``checkpoint-<step>/`` folders) or single checkpoints.
        method: use this method for every run instead of reading it from the files.
    Raises:
        InputError: a path that does not exist, or a checkpoint given twice.
    """
    runs = [runs] if isinstance(runs, str | os.PathLike) else list(runs)
    found: list[Checkpoint] = []
    for run, label in zip(runs, _labels([Path(r) for r in runs]), strict=True):
        found += _checkpoints_of(Path(run), label, method)
    seen: set[Path] = set()
    for checkpoint in found:
        key = checkpoint.path.resolve()
        if key in seen:
            raise InputError.of(
                checkpoint.path,
                "given twice (as a run or inside one); each checkpoint may appear once in a series",
            )
        seen.add(key)
    return found


def _checkpoints_of(path: Path, label: str, method: str | None) -> list[Checkpoint]:
    """The checkpoints of one run folder, or the one checkpoint ``path`` is."""
    if not path.exists():
        raise InputError.of(path, "no such run folder or checkpoint")
    # find_checkpoints also answers for a lone checkpoint folder (itself): that is handled below
    steps = [(s, c) for s, c in find_checkpoints(path) if c != path] if path.is_dir() else []
    if steps:
        return [Checkpoint(label, path, s, method or run_method(c, path), c) for s, c in steps]
    in_run = checkpoint_step(path) is not None and (path.parent / RUN_FILE).is_file()
    run_dir = path.parent if in_run else None
    step = trainer_step(path) if path.is_dir() else checkpoint_step(path)
    return [Checkpoint(label, run_dir, step, method or run_method(path, run_dir), path)]


def _labels(paths: list[Path]) -> list[str]:
    """A run's label: its folder's name (a ``checkpoint-<step>`` path belongs to the folder above), or
    the folder path where two different folders share a name."""
    keys = [p.parent if checkpoint_step(p) is not None else p for p in paths]
    names = {k: (k.name or str(k)) for k in keys}
    if len(set(names.values())) < len(names):
        names = {k: str(k) for k in keys}
    return [names[k] for k in keys]


# ------------------------------------------------------------------------------------ the base


def named_base(
    checkpoint: PathLike, run_dir: PathLike | None = None, *, adapters_only: bool = False
) -> str | None:
    """The base model a checkpoint names, or None where none does.

    ``run_dir``'s ``run.json`` ``base_model`` first; else the ``adapter_config.json`` beside
    ``checkpoint`` (the folder, or the folder of a weights file) ``base_model_name_or_path``; else,
    unless ``adapters_only``, its ``config.json`` ``_name_or_path`` (an FT checkpoint saved by
    transformers names the model it was loaded from).
    """
    if run_dir is not None and not adapters_only:
        base = _text_field(Path(run_dir) / RUN_FILE, _json_object(Path(run_dir) / RUN_FILE), "base_model")
        if base is not None:
            return base
    path = Path(checkpoint)
    folder = path if path.is_dir() else path.parent
    sources = [(ADAPTER_CONFIG, "base_model_name_or_path")]
    if not adapters_only:
        sources.append(("config.json", "_name_or_path"))
    for file, key in sources:
        value = _text_field(folder / file, _json_object(folder / file), key)
        if value is not None:
            return value
    return None


def base_of_runs(runs: PathLike | Sequence[PathLike] | Sequence[Checkpoint]) -> Path:
    """The one base model the runs (or their checkpoints) name, resolved to a local folder (a path or
    a model id in the local Hugging Face cache).

    Raises:
        InputError: none names one, or they name different bases.
    """
    from dora_analysis.readers.hub import resolve_model

    if isinstance(runs, str | os.PathLike) or not all(isinstance(c, Checkpoint) for c in runs):
        runs = run_checkpoints(runs)  # type: ignore[arg-type]
    checkpoints: list[Checkpoint] = list(runs)  # type: ignore[arg-type]
    bases = {b for b in (named_base(c.path, c.run_dir) for c in checkpoints) if b is not None}
    if len(bases) != 1:
        where = checkpoints[0].path if checkpoints else "runs"
        problem = (
            "no run.json, adapter_config.json or config.json names its base model"
            if not bases
            else f"the runs name different bases: {sorted(bases)}"
        )
        raise InputError.of(where, f"{problem}; give the base checkpoint explicitly")
    return resolve_model(bases.pop())


# ---------------------------------------------------------------------------------- the training log


def _log_history(checkpoint: Path) -> list[dict]:
    """The checkpoint's ``trainer_state.json`` ``log_history`` (``[]`` where there is none).

    Raises:
        InputError: a state file that is not an object, or a ``log_history`` that is not a list of
            objects (:func:`~dora_analysis.readers.trainer.read_trainer_state`).
    """
    state = read_trainer_state(checkpoint) if checkpoint.is_dir() else {}
    return state.get("log_history") or []


def eval_at(checkpoint: Path, step: int | None) -> tuple[str | None, float, float]:
    """``(metric name, metric, eval_loss)`` logged at ``step`` in the checkpoint's trainer state."""
    entries = [e for e in _log_history(checkpoint) if step is not None and e.get("step") == step]
    entries = [e for e in entries if any(k.startswith("eval_") for k in e)]
    name = default_metric(k for e in entries for k in e)
    state = checkpoint / STATE_FILE
    metric = _logged_number(state, entries[-1], name) if name and name in entries[-1] else math.nan
    has_loss = entries and "eval_loss" in entries[-1]
    loss = _logged_number(state, entries[-1], "eval_loss") if has_loss else math.nan
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
    last: dict[str, Checkpoint] = {}
    for checkpoint in run_checkpoints(runs, method):
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


# --------------------------------------------------------------------------- how a series is read


def memory_groups(checkpoints: list[Checkpoint]) -> list[list[Checkpoint]]:
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
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.is_file()]
    return sum(
        p.stat().st_size
        for p in files
        if p.suffix.lower() in (".bin", ".pt", ".pth")
        and not is_training_state_file(p)
        and not zipfile.is_zipfile(p)
    )


def final_indices(checkpoints: list[Checkpoint]) -> list[int]:
    """Per checkpoint, the index of its run's final (highest-step) checkpoint (itself when unnumbered)."""
    last: dict[str, int] = {}
    for index, c in enumerate(checkpoints):
        if c.step is None:
            continue
        best = last.get(c.run)
        if best is None or c.step >= checkpoints[best].step:
            last[c.run] = index
    return [last.get(c.run, index) if c.step is not None else index for index, c in enumerate(checkpoints)]
