"""What one training run is (training/config.py): defaults, and each bad value named by its option."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dora_analysis.errors import InputError
from dora_analysis.training.config import DEFAULT_LR, TrainConfig, check_config


def _model(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


def test_learning_rate_defaults_per_method_and_sgd_needs_one(tmp_path):
    for method in ("ft", "lora", "dora"):
        assert TrainConfig(method=method, out=tmp_path).learning_rate == DEFAULT_LR[method]
    assert TrainConfig(method="lora", out=tmp_path, lr=3e-3).learning_rate == 3e-3
    with pytest.raises(InputError, match="--lr"):
        TrainConfig(method="lora", out=tmp_path, optimizer="sgd").learning_rate  # noqa: B018


@pytest.mark.parametrize(
    "change, option",
    [
        ({"method": "vera"}, "--method"),
        ({"steps": 0}, "--steps"),
        ({"save_every": 0}, "--save-every"),
        ({"optimizer": "adam"}, "--optimizer"),
        ({"momentum": 1.0}, "--momentum"),
        ({"dropout": -0.1}, "--dropout"),
        ({"lr": 0.0}, "--lr"),
        ({"targets": ()}, "--targets"),
        ({"precision": "fp8"}, "--precision"),
    ],
)
def test_each_bad_value_names_its_option(tmp_path, change, option):
    good = TrainConfig(method="dora", out=tmp_path / "out", model=_model(tmp_path / "model"))
    assert check_config(good) == tmp_path / "model"
    with pytest.raises(InputError) as caught:
        check_config(dataclasses.replace(good, **change))
    assert option in str(caught.value) and "\n" not in str(caught.value)


def test_the_model_must_be_a_hugging_face_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        check_config(TrainConfig(method="ft", out=tmp_path / "out", model=tmp_path / "empty"))
