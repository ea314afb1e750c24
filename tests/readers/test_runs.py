"""readers/runs.py: runs on disk, their methods, steps, logs and the base they name; every field typed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dora_analysis.errors import InputError
from dora_analysis.readers.runs import (
    base_of_runs,
    eval_at,
    final_indices,
    named_base,
    run_checkpoints,
    run_method,
    training_history,
)


def _checkpoint(run: Path, step: int, state: object | None = None) -> Path:
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"w.weight": torch.zeros(2, 2)}, folder / "model.safetensors")
    if state is not None:
        (folder / "trainer_state.json").write_text(json.dumps(state))
    return folder


def test_method_and_base_come_from_run_json_then_adapter_then_config(tmp_path: Path):
    run = tmp_path / "run"
    folder = _checkpoint(run, 10)
    assert run_method(folder, run) == "ft" and named_base(folder, run) is None
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "cfg-base"}))
    assert named_base(folder, run) == "cfg-base" and named_base(folder, run, adapters_only=True) is None
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "adapter-base"}))
    assert named_base(folder, run) == "adapter-base"
    (run / "run.json").write_text(json.dumps({"method": "DoRA", "base_model": "run-base"}))
    assert run_method(folder, run) == "dora" and named_base(folder, run) == "run-base"
    assert named_base(folder, run, adapters_only=True) == "adapter-base"


@pytest.mark.parametrize(
    ("file", "content", "field"),
    [
        ("run.json", {"method": 5}, "method"),
        ("run.json", {"method": "ft", "base_model": ["a"]}, "base_model"),
        ("adapter_config.json", {"base_model_name_or_path": 3}, "base_model_name_or_path"),
        ("config.json", {"_name_or_path": {"x": 1}}, "_name_or_path"),
    ],
)
def test_a_field_of_the_wrong_type_is_one_line_naming_file_and_field(tmp_path: Path, file, content, field):
    run = tmp_path / "run"
    folder = _checkpoint(run, 10)
    (run / file if file == "run.json" else folder / file).write_text(json.dumps(content))
    with pytest.raises(InputError) as caught:
        run_method(folder, run) if field == "method" else named_base(folder, run)
    message = str(caught.value)
    assert file in message and repr(field) in message and "\n" not in message


def test_a_trainer_state_that_is_not_an_object_or_a_log_that_is_not_a_list_is_refused(tmp_path: Path):
    bad_state = _checkpoint(tmp_path / "a", 10, state=[{"step": 10}])
    with pytest.raises(InputError, match="not a JSON object"):
        eval_at(bad_state, 10)
    _checkpoint(tmp_path / "b", 10, state={"log_history": {"step": 10}})
    with pytest.raises(InputError, match="'log_history' is dict; expected a list"):
        training_history(tmp_path / "b")


def test_eval_metric_at_the_step_and_final_indices(tmp_path: Path):
    run = tmp_path / "run"
    log = [{"step": 10, "eval_accuracy": 0.5, "eval_loss": 1.0}, {"step": 20, "eval_accuracy": 0.75}]
    for step in (10, 20):
        _checkpoint(run, step, state={"global_step": step, "log_history": log[: step // 10]})
    checkpoints = run_checkpoints(run)
    assert [c.step for c in checkpoints] == [10, 20]
    assert eval_at(checkpoints[0].path, 10) == ("eval_accuracy", 0.5, 1.0)
    name, metric, loss = eval_at(checkpoints[1].path, 20)
    assert (name, metric) == ("eval_accuracy", 0.75) and loss != loss  # NaN: no eval_loss logged at 20
    assert final_indices(checkpoints) == [1, 1]
    assert training_history(run)["step"].tolist() == [10, 20]


def test_base_of_runs_needs_exactly_one_base(tmp_path: Path):
    for name, base in (("a", "x"), ("b", "y")):
        run = tmp_path / name
        _checkpoint(run, 1)
        (run / "run.json").write_text(json.dumps({"method": "ft", "base_model": str(tmp_path / base)}))
        (tmp_path / base).mkdir()
    assert base_of_runs(tmp_path / "a") == tmp_path / "x"
    with pytest.raises(InputError, match="different bases"):
        base_of_runs([tmp_path / "a", tmp_path / "b"])
