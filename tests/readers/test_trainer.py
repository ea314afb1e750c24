"""Trainer runs (readers/trainer.py): checkpoint-<step> folders, their steps, and no training state read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reader_checks import (
    assert_same,
    read_all,
    write_training_state,
)
from tiny_models import save_tiny_bert

from dora_analysis.errors import InputError
from dora_analysis.readers import find_checkpoints, open_checkpoint


def test_trainer_checkpoint_never_reads_training_state(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint-5"
    state = save_tiny_bert(ckpt)
    write_training_state(ckpt, 5)
    assert_same(read_all(ckpt), state)
    with pytest.raises(InputError, match="training-state file"):
        open_checkpoint(ckpt / "optimizer.pt")


def test_find_checkpoints_sorts_steps_and_skips_non_checkpoints(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step in (10, 2):
        (run / f"checkpoint-{step}").mkdir(parents=True)
    (run / "checkpoint-final").mkdir()
    (run / "checkpoint-3").write_text("not a folder")
    torch.save({}, run / "optimizer.pt")
    assert find_checkpoints(run) == [(2, run / "checkpoint-2"), (10, run / "checkpoint-10")]

    single = tmp_path / "final"
    save_tiny_bert(single)
    write_training_state(single, 7)
    assert find_checkpoints(single) == [(7, single)]

    empty = tmp_path / "empty"
    empty.mkdir()
    torch.save({}, empty / "optimizer.pt")
    with pytest.raises(InputError, match="no weights"):
        find_checkpoints(empty)
