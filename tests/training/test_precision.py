"""train --precision (autocast; fp16 with a GradScaler) and --device / --fsdp checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_tiny_encoder

from dora_analysis.training import TrainConfig, train

QUICK = dict(steps=2, save_every=2, batch_size=8, max_train_examples=16, max_eval_examples=8, threads=1)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny-bert"))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_run_trains_the_magnitude(tiny_model, tmp_path, precision):
    out = train(
        TrainConfig(method="dora", out=tmp_path / precision, model=tiny_model, precision=precision, **QUICK),
        progress=False,
    )
    record = json.loads((out / "run.json").read_text())
    assert record["precision"] == precision and record["device"] == "cpu" and record["processes"] == 1
    losses = [
        e["loss"]
        for e in json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
        if "loss" in e
    ]
    assert losses and all(math.isfinite(v) for v in losses)
    tensors = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    base = load_file(tiny_model / "model.safetensors")
    for name, value in tensors.items():
        assert value.dtype == torch.float32  # the trained parameters stay float32 under autocast
        if name.endswith("lora_magnitude_vector"):
            weight = base[
                name.removeprefix("base_model.model.bert.").replace("lora_magnitude_vector", "weight")
            ]
            assert (value.double() - torch.linalg.vector_norm(weight.double(), dim=1)).abs().max() > 1e-5, (
                name
            )
