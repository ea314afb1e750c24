"""Every output format holds the same numbers: float64 exactly, NaN as null, integers as integers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dora_analysis.errors import InputError
from dora_analysis.views.tables import format_for, render, write_frame

TINY = 1.0000000000000002e-12  # a ΔD of a nearly unchanged row: 10 decimals would write 0.0


def _frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "tensor": ["a.weight", "b\nweight", "c.weight", "d.weight"],
            "layer": pd.array([0, None, 2, 11], dtype="Int64"),  # nullable: embeddings have no layer
            "rows": np.array([32, 32, 64, 7], dtype=np.int64),
            "delta_magnitude": [0.1 + 0.2, rng.random(), math.nan, 1e-300],
            "delta_direction": [TINY, 2.220446049250313e-16, 1 / 3, math.nan],
            "status": ["ok", "ok", "non-finite", "ok"],
        }
    )


def _read(path: Path, fmt: str) -> pd.DataFrame:
    if fmt == "csv":
        return pd.read_csv(path, dtype={"layer": "Int64"})
    if fmt == "parquet":
        return pd.read_parquet(path)
    return pd.DataFrame(json.loads(path.read_text())).astype({"layer": "Int64"})


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_each_format_reads_back_the_same_numbers_bit_for_bit(tmp_path: Path, fmt: str) -> None:
    frame = _frame()
    path = tmp_path / f"deltas.{fmt}"
    write_frame(frame, None, path)  # the format follows the extension
    back = _read(path, fmt)
    for column in ("delta_magnitude", "delta_direction"):
        ours, theirs = frame[column].to_numpy(), back[column].to_numpy(dtype=np.float64)
        assert np.array_equal(ours, theirs, equal_nan=True), (fmt, column, ours, theirs)
    assert back["layer"].tolist() == frame["layer"].tolist()  # pd.NA where the layer is missing
    assert back["rows"].tolist() == [32, 32, 64, 7] and back["tensor"].tolist() == frame["tensor"].tolist()


def test_json_keeps_integers_and_writes_null_for_missing(tmp_path: Path) -> None:
    records = json.loads(render(_frame(), "json"))
    assert [r["layer"] for r in records] == [0, None, 2, 11]
    assert all(type(r["layer"]) is int for r in records if r["layer"] is not None)
    assert all(type(r["rows"]) is int for r in records)
    assert records[0]["delta_direction"] == TINY and records[0]["delta_magnitude"] == 0.1 + 0.2
    assert records[2]["delta_magnitude"] is None and records[3]["delta_direction"] is None
    assert "NaN" not in render(_frame(), "json")  # strict JSON
    assert render(_frame(), "csv").splitlines()[1].startswith("a.weight,0,32,")  # not 0.0


def test_format_follows_the_extension_and_a_conflict_is_an_error(tmp_path: Path) -> None:
    assert [format_for(f"x{ext}", None) for ext in (".csv", ".json", ".parquet", ".txt", ".out")] == [
        "csv",
        "json",
        "parquet",
        "table",
        "table",
    ]
    assert format_for(None, None) == "table" and format_for("x.CSV", "csv") == "csv"
    with pytest.raises(InputError, match="--format: csv conflicts"):
        format_for("x.json", "csv")
    with pytest.raises(InputError, match="--output"):
        format_for(None, "parquet")
    write_frame(_frame(), None, tmp_path / "t.txt")
    assert (tmp_path / "t.txt").read_text() == render(_frame(), "table")
