"""`python -m dora_analysis train`: --device, --fsdp and --precision refused in one line before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_encoder

from dora_analysis.commands.main import main


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny-bert"))


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
