"""analysis/planning.py: what a comparison analyses, decided from names, shapes and dtypes alone."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from reader_checks import MemoryReader

from dora_analysis.analysis.planning import (
    LayoutWarning,
    RecordColumns,
    finished_frames,
    plan_comparison,
    select_tensors,
)
from dora_analysis.errors import InputError
from dora_analysis.schema import COLUMNS


def _base() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "encoder.layer.1.attention.self.query.weight": torch.randn(4, 3, generator=g),
        "encoder.layer.0.attention.self.query.weight": torch.randn(4, 3, generator=g),
        "encoder.layer.0.attention.self.query.bias": torch.randn(4, generator=g),
        "encoder.layer.0.output.LayerNorm.weight": torch.randn(4, generator=g),
    }


def test_plan_selects_2d_linear_weights_pairs_each_run_and_reads_nothing():
    base = MemoryReader(_base(), "base")
    full = MemoryReader({k: v + 1 for k, v in _base().items()}, "full")
    partial = MemoryReader(
        {"encoder.layer.0.attention.self.query.weight": torch.zeros(4, 3)}, "adapter", True
    )
    plan = plan_comparison(base, [full, partial])
    weights = ["encoder.layer.1.attention.self.query.weight", "encoder.layer.0.attention.self.query.weight"]
    assert list(plan.selections[0].pairs) == weights  # biases and norms have no rows to decompose
    assert list(plan.selections[1].pairs) == weights[1:] and plan.selections[1].base_only == []
    assert plan.order == weights and plan.ambiguous == []
    assert base.reads == full.reads == partial.reads == []  # planning reads no tensor


def test_plan_refuses_what_cannot_be_compared():
    base = MemoryReader(_base(), "base")
    other = MemoryReader({"encoder.layer.0.attention.self.query.weight": torch.zeros(3, 4)}, "tuned")
    with pytest.raises(InputError, match=r"shape \[3, 4\] != base shape \[4, 3\]"):
        select_tensors(base, other)
    ints = MemoryReader(
        {"encoder.layer.0.attention.self.query.weight": torch.zeros(4, 3, dtype=torch.int8)}, "q"
    )
    with pytest.raises(InputError, match="stored as int8, expected a floating-point weight"):
        select_tensors(base, ints)


def test_layouts_guessed_from_names_are_warned_once_and_labelled_on_the_frames():
    names = {"h.0.attn.c_attn.weight": torch.zeros(3, 9), "h.1.attn.c_attn.weight": torch.zeros(3, 9)}
    base, tuned = MemoryReader(names, "gpt2-base"), MemoryReader(dict(names), "gpt2-tuned")
    with pytest.warns(LayoutWarning, match="2 tensors' layout guessed from the name") as caught:
        plan = plan_comparison(base, [tuned])
    assert len(caught) == 1 and plan.ambiguous == list(names)
    table = RecordColumns()
    for i, n in reversed(list(enumerate(names))):
        table.extend({"tensor": [n], "stack": ["model"], "layer": [i], "module": ["attn.c_attn"]})
    (frame,) = finished_frames([table], plan, COLUMNS)
    assert list(frame.columns) == COLUMNS and frame["tensor"].tolist() == list(names)  # the schema's order
    assert frame.attrs["layout_ambiguous"] == list(names) and frame.attrs["layout_rule"] == plan.layout_rule
    assert isinstance(frame, pd.DataFrame) and frame["layer"].dtype == "Int64"


def test_record_columns_pad_what_a_block_lacks_and_refuse_ragged_blocks():
    table = RecordColumns()
    assert table.extend({"tensor": ["a", "b"], "delta_magnitude": [0.5, 0.25]}) == 2
    assert table.extend({"tensor": ["c"], "spectrum_rank": [3]}) == 1
    assert table.columns == {
        "tensor": ["a", "b", "c"],
        "delta_magnitude": [0.5, 0.25, None],
        "spectrum_rank": [None, None, 3],
    }
    with pytest.raises(ValueError, match="holds 1 values, not 2"):
        table.extend({"tensor": ["d", "e"], "status": ["ok"]})
    assert table.length == 3 and all(len(c) == 3 for c in table.columns.values())  # nothing half-added
