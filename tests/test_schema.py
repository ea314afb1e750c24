"""The frame's shared names (schema.py): method order and labels, the default metric, points, modules."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from dora_analysis.errors import InputError
from dora_analysis.schema import (
    METHODS,
    default_metric,
    method_label,
    method_order,
    module_is,
    module_mask,
    points,
    select_modules,
)


def test_methods_keep_the_papers_order_and_labels():
    assert METHODS == ("ft", "lora", "dora")
    assert method_order({"zeta", "dora", "alpha", "ft"}) == ["ft", "dora", "alpha", "zeta"]
    assert [method_label(m) for m in ("DORA", "lora", "ft", "vera")] == ["DoRA", "LoRA", "FT", "vera"]


def test_default_metric_prefers_accuracy_and_skips_bookkeeping():
    assert default_metric(["loss", "eval_loss", "eval_f1", "eval_accuracy"]) == "eval_accuracy"
    assert default_metric(["eval_runtime", "eval_f1", "eval_mcc"]) == "eval_f1"
    assert default_metric(["loss", "eval_loss", "epoch"]) is None


def test_points_drop_unchanged_and_nonfinite_rows():
    df = pd.DataFrame(
        {
            "delta_direction": [0.0, 0.0, 1e-9, math.nan, 0.2, math.inf],
            "delta_magnitude": [0.0, 1e-9, 0.0, 0.1, 0.3, 0.1],
        }
    )
    assert list(points(df).index) == [1, 2, 4]


def test_short_module_names_select_full_paths_but_never_pool_two():
    modules = pd.Series(["attention.self.query", "attention.self.value", "output.dense"])
    assert module_is("attention.self.query", "self.query") and not module_is("attention.self.query", "ery")
    assert list(module_mask(modules, "query")) == [True, False, False]
    bart = pd.Series(["self_attn.q_proj", "encoder_attn.q_proj", "q_proj"])
    assert list(module_mask(bart, "q_proj")) == [False, False, True]  # the exact name wins
    with pytest.raises(InputError, match="several modules"):
        module_mask(bart[:2], "q_proj")
    df = pd.DataFrame({"module": list(modules), "x": [1, 2, 3]})
    picked = select_modules(df, ["value", "query"])
    assert list(picked.module) == ["value", "query"] and list(picked.x) == [2, 1]
    assert select_modules(df, []).empty
