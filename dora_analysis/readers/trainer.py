"""Hugging Face Trainer runs: the ``checkpoint-<step>`` folders of an ``output_dir``, and their steps.

The one parser of ``checkpoint-<step>`` names (:func:`checkpoint_step`) and of a checkpoint's step
(:func:`trainer_step`); the series analysis uses them too.
"""

from __future__ import annotations

import re
from pathlib import Path

from dora_analysis.errors import InputError
from dora_analysis.readers.folder import find_weights
from dora_analysis.readers.json_file import json_field, read_json_object

__all__ = [
    "MAX_STEP_DIGITS",
    "STATE_FILE",
    "checkpoint_step",
    "find_checkpoints",
    "read_trainer_state",
    "trainer_step",
]

STATE_FILE = "trainer_state.json"
MAX_STEP_DIGITS = 18  # every step below 10**18 fits an int64 column
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(folder: Path) -> int | None:
    """The ``<step>`` of a folder named ``checkpoint-<step>``, None for any other name.

    Raises :class:`InputError` for a step of more than :data:`MAX_STEP_DIGITS` digits (it would not
    fit the table's integer column), checked before any work.
    """
    found = _CHECKPOINT.match(folder.name)
    if not found:
        return None
    digits = found.group(1)
    if len(digits.lstrip("0")) > MAX_STEP_DIGITS:
        raise InputError.of(
            folder, f"checkpoint step has {len(digits)} digits; at most {MAX_STEP_DIGITS} are read"
        )
    return int(digits)


def read_trainer_state(folder: Path) -> dict:
    """``folder``'s ``trainer_state.json`` (``{}`` when there is none); :class:`InputError` when it is not
    a JSON object or its ``log_history`` is not a list of objects."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        return {}
    state = read_json_object(path, "trainer state")
    history = json_field(path, state, "log_history", list)
    if history is not None and not all(isinstance(entry, dict) for entry in history):
        raise InputError.of(path, "field 'log_history' holds a non-object entry; expected a list of objects")
    return state


def trainer_step(folder: Path) -> int | None:
    """The step of one checkpoint folder: the ``<step>`` of ``checkpoint-<step>``, else
    ``trainer_state.json``'s ``global_step``, else None.

    Raises :class:`InputError` when both are present and disagree (which one is meant is unknown),
    or when the state file is unreadable or its ``global_step`` is not a non-negative integer.
    """
    named = checkpoint_step(folder)
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        return named
    step = json_field(state_file, read_trainer_state(folder), "global_step", int)
    if step is None:
        return named
    if step < 0:
        raise InputError.of(state_file, f"global_step is {str(step)[:40]!r}; expected a non-negative integer")
    if named is not None and named != step:
        raise InputError.of(
            state_file,
            f"global_step is {step} but the folder is named for step {named}; which is meant is unclear",
        )
    return step


def find_checkpoints(run_dir: Path | str) -> list[tuple[int, Path]]:
    """``[(step, folder)]`` of a Trainer run, sorted by step.

    ``run_dir`` holding ``checkpoint-<step>`` folders gives one entry each (step from the folder name,
    which the Trainer sets to ``global_step``: a ``trainer_state.json`` that disagrees is an error); two folders for one step (``checkpoint-10`` and
    ``checkpoint-010``) are an error. A folder that is itself a checkpoint (no such subfolders, but
    weights or an adapter inside) gives one entry, its step from :func:`trainer_step` (else 0).
    Nothing is opened or read beyond ``trainer_state.json``.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise InputError.of(run_dir, "no such file or folder")
    if not run_dir.is_dir():
        raise InputError.of(
            run_dir, "is a file; expected a training output folder with checkpoint-<step> folders"
        )
    found: dict[int, Path] = {}
    for child in sorted(run_dir.iterdir()):
        if checkpoint_step(child) is None or not child.is_dir():
            continue
        step = trainer_step(child)  # the name's step, checked against trainer_state.json's
        assert step is not None
        if step in found:
            raise InputError.of(
                run_dir, f"two checkpoints for step {step} ({found[step].name} and {child.name}); keep one"
            )
        found[step] = child
    if found:
        return sorted(found.items())
    find_weights(run_dir)  # raises InputError when the folder holds no weights either
    step = trainer_step(run_dir)
    return [(0 if step is None else step, run_dir)]
