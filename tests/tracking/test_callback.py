"""The Trainer callback against the checkpoints the same Trainer saved: real transformers, real PEFT,
tiny BERT and LLaMA built from configs. A row recorded live at step N must equal the row
``dora_analysis.compare(base, checkpoint-N)`` computes from the files."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_models import tiny_bert_config

import dora_analysis
from dora_analysis.tracking.output import read_tracked

SAME = ["tensor", "stack", "layer", "module", "shape", "rows", "rows_excluded", "status", "layout"]
NUMBERS = ["delta_magnitude", "delta_direction", "base_magnitude_mean", "tuned_magnitude_mean"]


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
    )  # fmt: skip


def build(family: str, method: str, base_dir):
    """Save the base model to ``base_dir``; return the model to train (loaded back, PEFT-wrapped)."""
    from transformers import BertForSequenceClassification, LlamaForCausalLM

    cls, config = {
        "bert": (BertForSequenceClassification, tiny_bert_config),
        "llama": (LlamaForCausalLM, tiny_llama_config),
    }[family]
    torch.manual_seed(0)
    cls(config()).save_pretrained(base_dir)
    model = cls.from_pretrained(base_dir)
    if method == "ft":
        return model
    from peft import LoraConfig, get_peft_model

    targets = ["query", "value"] if family == "bert" else ["q_proj", "v_proj", "down_proj"]
    task = "SEQ_CLS" if family == "bert" else "CAUSAL_LM"
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=method == "dora", task_type=task)
    return get_peft_model(model, lora)


def dataset(family: str, n: int = 16) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (n, 12), generator=generator)
    if family == "bert":
        labels = torch.randint(0, 2, (n,), generator=generator)
        return [
            {"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y}
            for i, y in zip(ids, labels, strict=True)
        ]
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i.clone()} for i in ids]


def trainer(model, family, out, callback, max_steps=4):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, save_steps=2, per_device_train_batch_size=4,
        learning_rate=2e-2, logging_steps=1, report_to=[], use_cpu=True, seed=0,
        save_strategy="steps", lr_scheduler_type="constant", disable_tqdm=True,
    )  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=dataset(family), callbacks=[callback])


def assert_rows_equal(live: pd.DataFrame, reference: pd.DataFrame) -> None:
    live, reference = live.reset_index(drop=True), reference.reset_index(drop=True)
    assert len(live) == len(reference) > 0
    pd.testing.assert_frame_equal(live[SAME], reference[SAME], check_dtype=False)
    for column in NUMBERS:
        np.testing.assert_allclose(live[column], reference[column], rtol=1e-6, atol=0, err_msg=column)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("method", ["ft", "lora", "dora"])
def test_rows_equal_compare_on_the_saved_checkpoints(family, method, tmp_path):
    model = build(family, method, tmp_path / "base")
    callback = dora_analysis.DecompositionCallback(every=2, flush_seconds=math.inf)
    trainer(model, family, tmp_path / "run", callback).train()

    written = read_tracked(tmp_path / "run" / "deltas.csv")
    assert sorted(set(written["step"])) == [0, 2, 4]
    assert set(written["method"]) == {method} and set(written["run"]) == {"run"}
    for step in (2, 4):
        live = written[written["step"] == step]
        reference = dora_analysis.compare(tmp_path / "base", tmp_path / "run" / f"checkpoint-{step}")
        assert_rows_equal(live, reference)
        assert (live["delta_direction"] > 0).all()  # training moved every analysed weight
    start = written[written["step"] == 0]
    if method == "lora":  # B starts at zero: step 0 is the base itself
        assert (start["delta_magnitude"] == 0).all() and (start["delta_direction"].abs() < 1e-12).all()
    # the Trainer's log history got the per-module means of the latest record
    history = [e for e in trainer_state_log(tmp_path / "run" / "checkpoint-4") if "step" in e]
    module = written["module"].iloc[0]
    logged = [e[f"dora/{module}/delta_magnitude"] for e in history if f"dora/{module}/delta_magnitude" in e]
    assert logged and logged[-1] == pytest.approx(
        written[(written.step == 4) & (written.module == module)]["delta_magnitude"].mean()
    )


def trainer_state_log(checkpoint) -> list[dict]:
    import json

    return json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]


@pytest.mark.slow
def test_resuming_records_the_later_steps_once(tmp_path):
    base, out = tmp_path / "base", tmp_path / "run"
    trainer(build("bert", "dora", base), "bert", out, dora_analysis.DecompositionCallback(every=2)).train()
    first = read_tracked(out / "deltas.csv")
    callback = dora_analysis.DecompositionCallback(every=2)
    trainer(build("bert", "dora", tmp_path / "base2"), "bert", out, callback).train(
        resume_from_checkpoint=str(out / "checkpoint-2")
    )
    again = read_tracked(out / "deltas.csv")
    assert again.groupby("step").size().to_dict() == first.groupby("step").size().to_dict()
    assert_rows_equal(again[again.step <= 2], first[first.step <= 2])  # kept from the first run
    reference = dora_analysis.compare(base, out / "checkpoint-4")
    assert_rows_equal(again[again.step == 4], reference)


def test_bad_output_suffix_is_refused_at_once(tmp_path):
    with pytest.raises(dora_analysis.InputError, match="deltas.txt"):
        dora_analysis.DecompositionCallback(every=5, output=tmp_path / "deltas.txt")
    with pytest.raises(ValueError, match="every"):
        dora_analysis.DecompositionCallback(every=0)


@pytest.mark.slow
def test_evaluations_fill_the_eval_columns_as_analyze_series_reads_them(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = build("bert", "lora", tmp_path / "base")
    callback = dora_analysis.DecompositionCallback(every=2)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=4, save_steps=2, eval_strategy="steps", eval_steps=2,
        per_device_train_batch_size=4, learning_rate=2e-2, report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True,
    )  # fmt: skip

    def accuracy(prediction) -> dict:
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    data = dataset("bert")
    trainer = Trainer(
        model=model, args=args, train_dataset=data, eval_dataset=data[:8], compute_metrics=accuracy
    )
    callback.add_to(trainer)  # ahead of the reporters
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()
    tracked = read_tracked(tmp_path / "run" / "deltas.csv")
    series = dora_analysis.analyze_series(tmp_path / "base", tmp_path / "run")
    for step in (2, 4):
        mine = tracked[tracked.step == step]
        theirs = series[series.step == step]
        assert set(mine["eval_metric_name"]) == {"eval_accuracy"}
        np.testing.assert_array_equal(mine["eval_metric"].to_numpy(), theirs["eval_metric"].to_numpy())
        np.testing.assert_array_equal(mine["eval_loss"].to_numpy(), theirs["eval_loss"].to_numpy())
    assert tracked[tracked.step == 0]["eval_metric"].isna().all()
