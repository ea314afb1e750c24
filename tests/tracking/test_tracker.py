"""DecompositionTracker against ``compare`` on the same weights saved to disk (real PEFT, tiny BERT
from configs): LoRA/DoRA from live factors, FT against the base folder, bf16 models, autocast."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_models import tiny_bert_config

import dora_analysis
from dora_analysis.tracking.tracker import DecompositionTracker

SAME = ["tensor", "stack", "layer", "module", "shape", "rows", "status", "layout"]


def assert_rows_equal(live: pd.DataFrame, reference: pd.DataFrame, rtol: float = 1e-6) -> None:
    live, reference = live.reset_index(drop=True), reference.reset_index(drop=True)
    assert len(live) == len(reference) > 0
    pd.testing.assert_frame_equal(live[SAME], reference[SAME], check_dtype=False)
    for column in ("delta_magnitude", "delta_direction", "base_magnitude_mean", "tuned_magnitude_mean"):
        np.testing.assert_allclose(live[column], reference[column], rtol=rtol, atol=0, err_msg=column)


def perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=generator).to(p.dtype))


def base_model(folder, headless: bool = False):
    from transformers import BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    (BertModel if headless else BertForSequenceClassification)(tiny_bert_config()).save_pretrained(folder)
    return BertForSequenceClassification.from_pretrained(folder)


@pytest.mark.slow
@pytest.mark.parametrize("dora", [False, True])
def test_peft_rows_equal_compare_on_the_saved_adapter(dora, tmp_path):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], use_dora=dora, task_type="SEQ_CLS"
    )
    model = get_peft_model(base_model(tmp_path / "base"), config)
    perturb(model)
    with DecompositionTracker(model, run="r") as tracker:
        rows = tracker.record(7)
        assert tracker.method == ("dora" if dora else "lora")
    model.save_pretrained(tmp_path / "adapter")
    assert_rows_equal(rows, dora_analysis.compare(tmp_path / "base", tmp_path / "adapter"))
    assert set(rows["step"]) == {7} and rows["checkpoint"].isna().all()


@pytest.mark.slow
def test_peft_head_over_a_headless_base_is_left_out_as_compare_does(tmp_path):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query"], use_dora=True, task_type="SEQ_CLS")
    model = get_peft_model(base_model(tmp_path / "base", headless=True), config)
    perturb(model)
    rows = DecompositionTracker(model).record(1)
    model.save_pretrained(tmp_path / "adapter")
    reference = dora_analysis.compare(tmp_path / "base", tmp_path / "adapter")
    assert "classifier" not in set(reference["module"])
    assert_rows_equal(rows, reference)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_fine_tuning_reads_the_base_folder(dtype, tmp_path):
    model = base_model(tmp_path / "base").to(dtype)
    perturb(model, 0.01)
    tracker = DecompositionTracker(model)
    rows = tracker.record(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a record inside autocast computes the same
        inside = tracker.record(3)
    tracker.close()
    model.save_pretrained(tmp_path / "ft")
    reference = dora_analysis.compare(tmp_path / "base", tmp_path / "ft")
    assert_rows_equal(rows, reference)
    assert_rows_equal(inside, reference, rtol=0)
    frame = tracker.frame()
    assert list(frame["step"].unique()) == [2, 3] and set(frame["method"]) == {"ft"}


def test_merged_adapters_and_a_model_without_base_are_refused(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification

    model = get_peft_model(base_model(tmp_path / "base"), LoraConfig(r=2, target_modules=["query"]))
    model.merge_adapter()
    with pytest.raises(dora_analysis.InputError, match="merged"):
        DecompositionTracker(model)
    with pytest.raises(dora_analysis.InputError, match="base="):
        DecompositionTracker(BertForSequenceClassification(tiny_bert_config()))
