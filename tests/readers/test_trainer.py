"""``trainer_state.json`` read through the one loader: wrong JSON types are one line, never skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dora_analysis.errors import InputError
from dora_analysis.readers import find_checkpoints
from dora_analysis.readers.trainer import read_trainer_state, trainer_step


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
