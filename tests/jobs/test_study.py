"""The study job's pieces that run without training: the weight each convention measures, the summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dora_analysis.analysis.conventions import CONVENTIONS, MERGE_SCALED
from dora_analysis.jobs.study import _convention_weight, study_plan, study_row_steps, study_summary
from dora_analysis.readers.base import LowRankUpdate


def test_each_convention_measures_the_scaled_weight_or_the_unscaled_merge():
    generator = torch.Generator().manual_seed(0)
    w0 = torch.randn(5, 4, generator=generator)
    lora_A, lora_B = torch.randn(2, 4, generator=generator), torch.randn(5, 2, generator=generator)
    scaled = torch.randn(5, 4, generator=generator)  # stands for the checkpoint's weight merged with α/r
    update = LowRankUpdate("w", lora_A, lora_B, scale=4.0)
    # W0 + B A without the scale, in float64 NumPy; the merge is float32: each entry is a sum of
    # r + 1 = 3 terms, so its rounding is within a few float32 ulps of the largest term.
    a, b, w = lora_A.double().numpy(), lora_B.double().numpy(), w0.double().numpy()
    expected = w + b @ a
    largest = np.abs(w).max() + (np.abs(b) @ np.abs(a)).max()
    tolerance = 3 * 3 * np.finfo(np.float32).eps * largest
    for convention in CONVENTIONS:
        got = _convention_weight(w0, scaled, update, convention)
        if MERGE_SCALED[convention]:
            assert got is scaled
        else:
            np.testing.assert_allclose(got.double().numpy(), expected, rtol=0, atol=tolerance)
        assert _convention_weight(w0, scaled, None, convention) is scaled  # FT: nothing to merge again


def test_study_summary_prints_the_base_query_rows_and_the_report(tmp_path: Path):
    rows = []
    for cell in ("base", "wd-0.1"):
        for module in ("query", "value"):
            for convention in ("paper", "no_scale"):
                for method, r in (("ft", -0.5), ("dora", 0.25)):
                    rows.append(
                        {
                            "cell": cell,
                            "window": "paper",
                            "convention": convention,
                            "module": module,
                            "method": method,
                            "r": r + (cell != "base") + (module != "query") + (convention != "paper"),
                            "r_low": r - 0.125,
                            "r_high": r + 0.125,
                        }
                    )
    lines = study_summary(pd.DataFrame(rows), tmp_path)
    assert lines == [
        "   ft: query r = -0.50 [-0.62, -0.38] (base configuration)",
        " dora: query r = +0.25 [+0.12, +0.38] (base configuration)",
        f"report: {tmp_path / 'report.md'}",
    ]


@pytest.mark.parametrize("quick", [True, False])
def test_plan_windows_are_checkpoints_the_runs_save(quick: bool):
    plan = study_plan(quick)
    saved = set(range(plan.save_every, plan.steps + 1, plan.save_every))
    for steps in plan.windows.values():
        assert set(steps) <= saved


def test_row_steps_pool_each_cells_seeds_and_layers_on_fishers_z():
    rng = np.random.default_rng(0)
    rows = []
    for cell in ("base", "wd-0.1"):
        for seed in (0, 1):
            for step in (40, 80):
                for layer in range(6):
                    rows.append(
                        {
                            "cell": cell,
                            "seed": seed,
                            "run": f"{cell}/dora-seed{seed}",
                            "method": "dora",
                            "step": step,
                            "stack": None,
                            "layer": layer,
                            "module": "query",
                            "tensor": f"encoder.layer.{layer}.attention.self.query.weight",
                            "rows": 32,
                            "r_abs": rng.uniform(-0.9, 0.9),
                            "r_signed": rng.uniform(-0.9, 0.9),
                        }
                    )
    coupling = pd.DataFrame(rows)
    steps = study_row_steps(coupling)
    assert list(steps[["cell", "step"]].itertuples(index=False, name=None)) == [
        ("base", 40),
        ("base", 80),
        ("wd-0.1", 40),
        ("wd-0.1", 80),
    ]
    for row in steps.itertuples(index=False):
        own = coupling[(coupling["cell"] == row.cell) & (coupling["step"] == row.step)]
        assert row.matrices == 12 and row.layers == 6
        assert row.r_abs == pytest.approx(np.tanh(np.arctanh(own["r_abs"]).mean()), rel=1e-12)
        # the interval is the delete-one-layer jackknife's: both seeds' matrix of a layer leave together
        replicates = [np.tanh(np.arctanh(own[own["layer"] != k]["r_signed"]).mean()) for k in range(6)]
        assert row.r_signed_low < row.r_signed < row.r_signed_high
        assert row.r_signed_low <= min(replicates) and row.r_signed_high >= max(replicates)
        assert row.interval == "95% layer jackknife, t(5)"
