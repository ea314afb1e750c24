"""Hugging Face Trainer runs: the ``checkpoint-<step>`` folders of an ``output_dir``."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dora_analysis.errors import InputError

__all__ = ["find_checkpoints", "trainer_step"]

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def trainer_step(folder: Path) -> int | None:
    """``global_step`` from ``folder/trainer_state.json``, else the ``<step>`` of ``checkpoint-<step>``."""
    state = folder / "trainer_state.json"
    if state.is_file():
        try:
            step = json.loads(state.read_text()).get("global_step")
            if isinstance(step, int):
                return step
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            pass  # a damaged state file: fall back to the folder name
    found = _CHECKPOINT.match(folder.name)
    return int(found.group(1)) if found else None


def find_checkpoints(run_dir: Path | str) -> list[tuple[int, Path]]:
    """``[(step, folder)]`` of a Trainer run, sorted by step.

    ``run_dir`` holding ``checkpoint-<step>`` folders gives one entry each (step from the folder name,
    which the Trainer sets to ``global_step``). A folder that is itself a checkpoint (no such
    subfolders, but weights or an adapter inside) gives one entry, its step from
    ``trainer_state.json``'s ``global_step`` (else its name, else 0). Nothing is opened or read
    beyond ``trainer_state.json``.
    """
    from dora_analysis.readers import find_weights  # the folder detection of open_checkpoint

    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise InputError.of(run_dir, "no such file or folder")
    if not run_dir.is_dir():
        raise InputError.of(
            run_dir, "is a file; expected a training output folder with checkpoint-<step> folders"
        )
    found = []
    for child in run_dir.iterdir():
        m = _CHECKPOINT.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    if found:
        return sorted(found, key=lambda item: item[0])
    find_weights(run_dir)  # raises InputError when the folder holds no weights either
    return [(trainer_step(run_dir) or 0, run_dir)]
