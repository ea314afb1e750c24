"""Trainer runs (readers/trainer.py): checkpoint-<step> folders, their steps, and no training state read."""

from __future__ import annotations

import json
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
from dora_analysis.readers.trainer import read_trainer_state, trainer_step


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


def _checkpoint(folder: Path, state: object) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"")  # found, never opened
    (folder / "trainer_state.json").write_text(json.dumps(state))
    return folder


@pytest.mark.parametrize(
    ("state", "says"),
    [
        ([{"global_step": 10}], "trainer state is not a JSON object"),
        ({"global_step": "10"}, "field 'global_step' is \"10\"; expected an integer"),
        ({"global_step": True}, "field 'global_step' is true; expected an integer"),
        ({"global_step": 10, "log_history": {"step": 10}}, "field 'log_history' is dict; expected a list"),
        ({"global_step": 10, "log_history": [3]}, "'log_history' holds a non-object entry"),
    ],
)
def test_a_mistyped_trainer_state_is_refused_naming_the_field(tmp_path: Path, state: object, says: str):
    folder = _checkpoint(tmp_path / "run" / "checkpoint-10", state)
    with pytest.raises(InputError) as caught:
        find_checkpoints(tmp_path / "run")
    message = str(caught.value)
    assert message.startswith(str(folder / "trainer_state.json")) and says in message, message


def test_a_well_typed_state_gives_its_step(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path / "lone", {"global_step": 7, "log_history": [{"step": 7, "loss": 1.0}]})
    assert trainer_step(folder) == 7
    assert read_trainer_state(folder)["log_history"] == [{"step": 7, "loss": 1.0}]
    assert read_trainer_state(tmp_path) == {}
