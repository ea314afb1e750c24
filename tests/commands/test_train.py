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


def test_study_factor_options_reach_run_json_or_are_refused(tiny_model, tmp_path, capsys):
    """--schedule, --weight-decay, --no-decay-magnitude, --no-detach-norm: recorded in run.json; the
    DoRA-only ones refused in one line for another method."""
    import json

    argv = ["train", "--model", str(tiny_model), "--steps", "2", "--save-every", "2", "--quiet"]
    argv += ["--max-train-examples", "16", "--max-eval-examples", "8"]
    assert main([*argv, "--method", "lora", "--out", str(tmp_path / "a"), "--no-detach-norm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--no-detach-norm: applies to --method dora only" in err
    flags = ["--schedule", "constant", "--weight-decay", "0.1", "--no-decay-magnitude", "--no-detach-norm"]
    assert main([*argv, "--method", "dora", "--out", str(tmp_path / "b"), *flags]) == 0
    config = json.loads((tmp_path / "b" / "run.json").read_text())["config"]
    assert (config["schedule"], config["weight_decay"]) == ("constant", 0.1)
    assert config["decay_magnitude"] is False and config["detach_norm"] is False
