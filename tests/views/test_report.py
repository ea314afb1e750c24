"""report.md (views/report.py): accuracy per method, the verdicts against the paper, one row per stack and module."""

from __future__ import annotations

import pandas as pd
from series_builders import bart_like_series, correlation_table, synthetic_series

from dora_analysis.analysis.correlation import correlations
from dora_analysis.views.report import PAPER_R, accuracy_table, paper_comparison, render_report


def test_paper_comparison_verdicts():
    verdicts = (
        paper_comparison(correlation_table({"ft": -0.58, "lora": 0.5, "dora": 0.4}))
        .set_index("method")
        .verdict
    )
    assert verdicts.to_dict() == {"ft": "reproduced", "lora": "same sign", "dora": "not reproduced"}
    assert paper_comparison(correlation_table({"ft": -0.6})).set_index("method").verdict["lora"] == "no data"
    assert PAPER_R == {"ft": -0.62, "lora": 0.83, "dora": -0.31}


def test_report_tables_and_accuracy():
    history = pd.DataFrame(
        [
            {"run": "a", "method": "lora", "step": 0, "eval_accuracy": 0.2},
            {"run": "a", "method": "lora", "step": 5, "eval_accuracy": 0.7},
            {"run": "a", "method": "lora", "step": 10, "eval_accuracy": 0.6},
            {"run": "b", "method": "ft", "step": 10, "eval_accuracy": 0.9},
        ]
    )
    accuracy = accuracy_table(history)
    assert list(accuracy.method) == ["ft", "lora"]
    lora = accuracy.set_index("method").loc["lora"]
    assert (lora.untrained, lora.final, lora.best, lora.best_step, lora.steps) == (0.2, 0.6, 0.7, 5, 10)
    series = pd.DataFrame(
        [
            {
                "run": "a",
                "method": "lora",
                "module": "query",
                "step": 10,
                "layer": 0,
                "delta_magnitude": 0.5,
                "delta_direction": 0.25,
            }
        ]
    )
    text = render_report(series, correlation_table({"lora": 0.8}), accuracy, majority_accuracy=0.25)
    assert "| LoRA | a | 10 | 0.200 | 0.600 | 0.700 | 5 |" in text
    assert "+0.80 [+0.70, +0.90]" in text and "scores 0.250" in text
    assert "| LoRA | query | 0.5 | 0.25 |" in text


def test_report_has_a_row_per_stack_and_module_and_names_the_bootstrap():
    df = bart_like_series()
    table = correlations(df)
    text = render_report(df, table, pd.DataFrame())
    # the default interval is named, and so is the earlier within-run bootstrap when asked for
    assert "delete-one-layer jackknife t interval" in text and "left out of every run at once" in text
    within = render_report(df, correlations(df, bootstrap="layers-within-run"), pd.DataFrame())
    assert "cluster-bootstrap interval that resamples whole layers" in within
    for method in ("FT", "LoRA", "DoRA"):
        for stack, module in (
            ("encoder", "self_attn.q_proj"),
            ("decoder", "encoder_attn.q_proj"),
            ("decoder", "self_attn.q_proj"),
        ):
            assert text.count(f"| {method} | {stack} | {module} | 9 | 3 x 3 |") == 1
    points_text = render_report(df, correlations(df, bootstrap="points"), pd.DataFrame())
    assert "resamples points as if independent" in points_text
    # a series without stacks keeps today's table: no stack or run column
    plain = render_report(synthetic_series(), correlations(synthetic_series()), pd.DataFrame())
    assert "| method | module | n |" in plain and "| FT | query | 24 | 4 x 6 |" in plain
    comparison = paper_comparison(correlations(synthetic_series()))
    assert list(comparison.method) == ["ft", "lora", "dora"] and comparison.run.isna().all()
