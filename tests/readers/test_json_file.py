"""The one JSON loader's typed fields: one line naming the file and the field, never a coercion."""

from __future__ import annotations

from pathlib import Path

import pytest

from dora_analysis.errors import InputError
from dora_analysis.readers.json_file import json_field

PATH = Path("run.json")


@pytest.mark.parametrize(
    ("value", "expected", "says"),
    [
        (5, str, "field 'method' is 5; expected a string"),
        ("5", int, "field 'method' is \"5\"; expected an integer"),
        (True, int, "field 'method' is true; expected an integer"),
        (True, float, "field 'method' is true; expected a number"),
        ([1], dict, "field 'method' is list; expected an object"),
        ({"a": 1}, list, "field 'method' is dict; expected a list"),
        (1.5, int, "field 'method' is 1.5; expected an integer"),
    ],
)
def test_a_mistyped_field_is_one_line_naming_file_and_field(value, expected, says) -> None:
    with pytest.raises(InputError) as caught:
        json_field(PATH, {"method": value}, "method", expected)
    assert str(caught.value) == f"run.json: {says}"


def test_present_values_pass_and_absent_ones_are_none_unless_required() -> None:
    record = {"method": "lora", "seed": 3, "lr": 1, "ok": False}
    assert json_field(PATH, record, "method", str) == "lora"
    assert json_field(PATH, record, "seed", int) == 3
    assert json_field(PATH, record, "lr", float) == 1.0 and isinstance(
        json_field(PATH, record, "lr", float), float
    )
    assert json_field(PATH, record, "ok", bool) is False
    assert json_field(PATH, record, "missing", str) is None
    with pytest.raises(InputError, match="run.json: has no 'missing' field"):
        json_field(PATH, record, "missing", str, required=True)
