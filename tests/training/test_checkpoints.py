"""``run.json`` read by :func:`load_trained_model`: each field type-checked, one line naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dora_analysis.errors import InputError
from dora_analysis.training import load_trained_model

GOOD = {"method": "lora", "task": {"labels": ["neg", "pos"]}, "base_model": "base", "seed": 0}


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"method": 5}, "field 'method' is 5; expected a string"),
        ({"method": "qlora"}, "field 'method' is 'qlora'; expected one of ft, lora, dora"),
        ({"task": ["neg", "pos"]}, "field 'task' is list; expected an object"),
        ({"task": {"labels": 2}}, "field 'labels' is 2; expected a list"),
        ({"task": {"labels": []}}, "field 'task.labels' is empty; expected the task's label names"),
        ({"base_model": 3}, "field 'base_model' is 3; expected a string"),
        ({"seed": "0"}, "field 'seed' is \"0\"; expected an integer"),
    ],
)
def test_a_mistyped_run_json_is_one_line_naming_the_field(tmp_path: Path, fields: dict, says: str) -> None:
    (tmp_path / "run.json").write_text(json.dumps({**GOOD, **fields}))
    (tmp_path / "checkpoint-1").mkdir()
    with pytest.raises(InputError) as caught:
        load_trained_model(tmp_path / "checkpoint-1")
    assert str(caught.value) == f"{tmp_path / 'run.json'}: {says}"


def test_a_run_json_that_is_a_list_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text(json.dumps([GOOD]))
    (tmp_path / "checkpoint-1").mkdir()
    with pytest.raises(InputError, match="run.json: run.json is not a JSON object"):
        load_trained_model(tmp_path / "checkpoint-1")
