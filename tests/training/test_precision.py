"""train --precision (autocast; fp16 with a GradScaler) and --device / --fsdp checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_tiny_encoder

from dora_analysis.commands.main import main
from dora_analysis.training import TrainConfig, train

QUICK = dict(steps=2, save_every=2, batch_size=8, max_train_examples=16, max_eval_examples=8, threads=1)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny-bert"))


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


def test_device_precision_and_fsdp_checks(tiny_model, tmp_path, capsys):
    argv = ["train", "--method", "dora", "--model", str(tiny_model), "--steps", "1", "--quiet"]
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU (cuda:0 on a machine without)
    assert main([*argv, "--out", str(tmp_path / "a"), "--device", missing]) == 2
    assert "--device" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "b"), "--device", "no-such-device"]) == 2
    assert "not a torch device" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "c"), "--fsdp"]) == 2  # not under torchrun
    assert "torchrun" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written by a refused run
    assert main([*argv, "--out", str(tmp_path / "d"), "--precision", "fp8"]) == 2  # one line, as every option
    assert "--precision" in capsys.readouterr().err
