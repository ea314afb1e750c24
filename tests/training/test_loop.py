from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_encoder

from dora_analysis.commands.main import main
from dora_analysis.errors import InputError
from dora_analysis.training import TrainConfig, evaluate, load_trained_model, train
from dora_analysis.training.data import encode, subset
from dora_analysis.training.tasks import load_task

QUICK = dict(
    steps=5, save_every=2, batch_size=8, max_train_examples=48, max_eval_examples=24, log_every=2, threads=1
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden 32) saved as a Hugging Face folder, with the real MiniLM tokenizer."""
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """One short run per method on the tiny model."""
    root = tmp_path_factory.mktemp("runs")
    return {
        method: train(
            TrainConfig(method=method, out=root / method, model=tiny_model, **QUICK), progress=False
        )
        for method in ("ft", "lora", "dora")
    }


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _inputs(tiny_model: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model, local_files_only=True)
    texts = list(load_task().eval_texts[:6])
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=48, return_tensors="pt"))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ft", "lora", "dora"])
def test_run_folder_layout(runs, tiny_model, method):
    run = runs[method]
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-5",
        "run.json",
    ]
    record = json.loads((run / "run.json").read_text())
    assert record["method"] == method and record["status"] == "completed"
    assert record["checkpoints"] == [2, 4, 5]
    assert record["base_model"] == str(tiny_model.resolve())
    assert record["weights_prefix"] == "bert."
    assert record["config"]["steps"] == 5 and record["config"]["rank"] == 8 and record["config"]["seed"] == 0
    assert record["config"]["lr"] == (1e-4 if method == "ft" else 3e-3)
    assert {"python", "torch", "transformers"} <= set(record["versions"])
    assert record["task"]["labels"] == list(load_task().labels)
    assert record["task"]["n_train"] == 48 and record["task"]["n_eval"] == 24

    for step in (2, 4, 5):
        checkpoint = run / f"checkpoint-{step}"
        weights = {"ft": {"config.json", "model.safetensors"}}.get(
            method, {"adapter_config.json", "adapter_model.safetensors"}
        )
        assert {p.name for p in checkpoint.iterdir()} == weights | {"trainer_state.json"}
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        assert state["global_step"] == step and state["max_steps"] == 5 and state["save_steps"] == 2
        history = state["log_history"]
        assert [e["step"] for e in history if "eval_accuracy" in e] == [0] + [
            s for s in (2, 4, 5) if s <= step
        ]
        assert [e["step"] for e in history if "loss" in e] == [s for s in (2, 4, 5) if s <= step]
        assert all(0.0 <= e["eval_accuracy"] <= 1.0 for e in history if "eval_accuracy" in e)
        assert all(e["loss"] > 0 for e in history if "loss" in e)
    assert record["final_accuracy"] == history[-1]["eval_accuracy"]


@pytest.mark.slow
def test_ft_weights_pair_with_the_base_names(runs, tiny_model):
    from safetensors import safe_open

    with (
        safe_open(tiny_model / "model.safetensors", "pt") as base,
        safe_open(runs["ft"] / "checkpoint-5" / "model.safetensors", "pt") as tuned,
    ):
        base_names = set(base.keys())
        tuned_names = set(tuned.keys())
        query = "encoder.layer.0.attention.self.query.weight"
        assert query in base_names and "bert." + query in tuned_names
        assert {"classifier.weight", "classifier.bias"} <= tuned_names
        assert {n for n in base_names if "position_ids" not in n} <= {
            n.removeprefix("bert.") for n in tuned_names
        }
        # full fine-tuning moved the pre-trained weight
        assert not torch.equal(base.get_tensor(query), tuned.get_tensor("bert." + query))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_peft_loads_each_checkpoint_and_reproduces_our_outputs(runs, tiny_model, method):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    inputs = _inputs(tiny_model)
    for step in (2, 4, 5):
        checkpoint = runs[method] / f"checkpoint-{step}"
        config = json.loads((checkpoint / "adapter_config.json").read_text())
        assert config["use_dora"] == (method == "dora") and config["modules_to_save"] == ["classifier"]
        assert sorted(config["target_modules"]) == ["query", "value"]
        ours = load_trained_model(checkpoint)
        base = AutoModelForSequenceClassification.from_pretrained(
            tiny_model, num_labels=5, local_files_only=True
        )
        reference = PeftModel.from_pretrained(base, checkpoint).eval()
        with torch.no_grad():
            expected = reference(**inputs).logits
            got = ours(**inputs).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # the adapter really trained: B moved away from its zero start
    with torch.no_grad():
        from safetensors.torch import load_file

        tensors = load_file(runs[method] / "checkpoint-5" / "adapter_model.safetensors")
    lora_b = [v for k, v in tensors.items() if k.endswith("lora_B.weight")]
    assert len(lora_b) == 4 and all(v.abs().max() > 0 for v in lora_b)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ft", "dora"])
def test_saved_checkpoint_is_the_trained_model(runs, tiny_model, method):
    """Re-evaluating a loaded checkpoint gives the held-out loss recorded while training."""
    from transformers import AutoTokenizer

    task = load_task()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model, local_files_only=True)
    checkpoint = runs[method] / "checkpoint-4"
    max_length = json.loads((runs[method] / "run.json").read_text())["config"]["max_length"]
    data = encode(tokenizer, *subset(task.eval_texts, task.eval_labels, 24), max_length)
    recorded = [
        e
        for e in json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
        if "eval_loss" in e and e["step"] == 4
    ][0]
    got = evaluate(load_trained_model(checkpoint), data, tokenizer.pad_token_id)
    assert got["eval_loss"] == pytest.approx(recorded["eval_loss"], rel=1e-6)
    assert got["eval_accuracy"] == recorded["eval_accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ft", "dora"])
def test_same_seed_gives_identical_checkpoints(runs, tiny_model, tmp_path, method):
    again = train(
        TrainConfig(method=method, out=tmp_path / "again", model=tiny_model, **QUICK), progress=False
    )
    first, second = _files(runs[method]), _files(again)
    first.pop("run.json"), second.pop("run.json")  # holds timings and the folder name
    assert list(first) == list(second)
    for name in first:
        assert first[name] == second[name], name
    other = train(
        TrainConfig(method=method, out=tmp_path / "other", model=tiny_model, **{**QUICK, "seed": 1}),
        progress=False,
    )
    weights = "model.safetensors" if method == "ft" else "adapter_model.safetensors"
    assert _files(other)[f"checkpoint-5/{weights}"] != first[f"checkpoint-5/{weights}"]


def test_training_leaves_the_callers_random_state_alone(tiny_model, tmp_path):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    train(
        TrainConfig(method="lora", out=tmp_path / "run", model=tiny_model, **{**QUICK, "steps": 1}),
        progress=False,
    )
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.slow
def test_refuses_a_folder_with_checkpoints_unless_overwrite(runs, tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    config = TrainConfig(method="lora", out=out, model=tiny_model, **QUICK)
    train(config, progress=False)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="already holds a run"):
        train(config, progress=False)
    argv = [
        "train",
        "--method",
        "lora",
        "--out",
        str(out),
        "--model",
        str(tiny_model),
        "--steps",
        "2",
        "--save-every",
        "1",
        "--batch-size",
        "8",
        "--max-train-examples",
        "16",
        "--max-eval-examples",
        "8",
        "--quiet",
    ]
    assert main(argv) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "checkpoint-5").is_dir()  # untouched by the refusal
    assert main([*argv, "--overwrite"]) == 0
    assert "lora: 2 checkpoints" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "checkpoint-2", "notes.txt", "run.json"]


def test_ctrl_c_leaves_complete_checkpoints(tiny_model, tmp_path):
    out = tmp_path / "run"
    calls = []

    def progress(n: int) -> None:
        calls.append(n)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(method="dora", out=out, model=tiny_model, **QUICK), progress=progress)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "run.json"]
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "interrupted" and record["checkpoints"] == [2]
    load_trained_model(out / "checkpoint-2")  # complete and readable


def test_progress_callback_counts_every_step(tiny_model, tmp_path):
    calls: list[int] = []
    train(TrainConfig(method="lora", out=tmp_path / "run", model=tiny_model, **QUICK), progress=calls.append)
    assert calls == [1] * 5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"steps": 0}, "--steps: must be at least 1"),
        ({"method": "qlora"}, "unknown method 'qlora'"),
        ({"dropout": 1.0}, "--dropout"),
        ({"targets": ()}, "at least one target"),
        ({"task": "nope"}, "unknown task"),
        ({"optimizer": "sgd"}, "--lr: SGD has no default learning rate"),
        ({"optimizer": "lion"}, "unknown optimizer 'lion'"),
        ({"optimizer": "sgd", "lr": 0.1, "momentum": 1.0}, "--momentum: must be in"),
    ],
)
def test_bad_options_are_input_errors(tiny_model, tmp_path, change, message):
    config = TrainConfig(
        **{"method": "lora", "out": tmp_path / "run", "model": tiny_model, **QUICK, **change}
    )
    with pytest.raises(InputError, match=message):
        train(config, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sgd_trains_the_same_parameters_and_is_recorded(runs, tiny_model, tmp_path, capsys):
    """--optimizer sgd: a DoRA run whose steps follow the gradient; run.json says how it was trained."""
    main(
        ["train", "--method", "dora", "--out", str(tmp_path / "sgd"), "--model", str(tiny_model)]
        + ["--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.5", "--quiet"]
        + ["--steps", "5", "--save-every", "2", "--max-train-examples", "48", "--max-eval-examples", "24"]
    )
    sgd, adamw = (json.loads((p / "run.json").read_text()) for p in (tmp_path / "sgd", runs["dora"]))
    assert (sgd["config"]["optimizer"], sgd["config"]["momentum"], sgd["config"]["lr"]) == ("sgd", 0.5, 0.05)
    assert adamw["config"]["optimizer"] == "adamw"
    assert sgd["trainable_parameters"] == adamw["trainable_parameters"]
    assert sgd["checkpoints"] == adamw["checkpoints"] == [2, 4, 5]
    from safetensors.torch import load_file

    moved = load_file(tmp_path / "sgd" / "checkpoint-5" / "adapter_model.safetensors")
    start = load_file(tmp_path / "sgd" / "checkpoint-2" / "adapter_model.safetensors")
    changed = [k for k in moved if not torch.equal(moved[k], start[k])]
    assert any("lora_magnitude_vector" in k for k in changed) and any("lora_B" in k for k in changed)


def test_model_folder_must_be_a_hugging_face_folder(tmp_path):
    with pytest.raises(InputError, match="no config.json"):
        train(TrainConfig(method="ft", out=tmp_path / "run", model=tmp_path), progress=False)


def test_targets_that_match_nothing_are_reported(tiny_model, tmp_path):
    config = TrainConfig(method="dora", out=tmp_path / "run", model=tiny_model, targets=("qkv",), **QUICK)
    with pytest.raises(InputError, match="qkv"):
        train(config, progress=False)
    assert not config.out.exists()  # the RUN_DIR it created is removed again, being empty
    kept = tmp_path / "mine"
    kept.mkdir()
    with pytest.raises(InputError, match="qkv"):
        train(
            TrainConfig(method="dora", out=kept, model=tiny_model, targets=("qkv",), **QUICK), progress=False
        )
    assert kept.is_dir()  # a folder the user made stays


def test_ctrl_c_while_saving_leaves_no_partial_checkpoint(tiny_model, tmp_path, monkeypatch):
    import dora_analysis.training.checkpoints as checkpoints

    write_json = checkpoints.write_json
    states: list[Path] = []

    def interrupted_on_second_state(path: Path, value) -> None:
        if path.name == "trainer_state.json":
            states.append(path)
            if len(states) == 2:
                raise KeyboardInterrupt
        write_json(path, value)

    monkeypatch.setattr(checkpoints, "write_json", interrupted_on_second_state)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(method="ft", out=out, model=tiny_model, **QUICK), progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "run.json"]
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"detach_norm": False}, "--no-detach-norm: applies to --method dora only"),
        ({"magnitude_only": True}, "--magnitude-only: applies to --method dora only"),
        ({"decay_magnitude": False}, "--no-decay-magnitude: applies to --method dora only"),
        ({"schedule": "cosine"}, "unknown schedule 'cosine'"),
        ({"weight_decay": -0.1}, "--weight-decay: must be at least 0"),
    ],
)
def test_dora_options_are_refused_where_they_would_do_nothing(tiny_model, tmp_path, change, message):
    config = TrainConfig(
        **{"method": "lora", "out": tmp_path / "run", "model": tiny_model, **QUICK, **change}
    )
    with pytest.raises(InputError, match=message):
        train(config, progress=False)


def test_constant_schedule_keeps_the_peak_rate_after_the_warm_up():
    from dora_analysis.training.loop import _schedule

    def rates(schedule: str) -> list[float]:
        parameter = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([parameter], lr=1.0)
        config = TrainConfig(method="ft", out=Path("x"), steps=10, warmup_ratio=0.2, schedule=schedule)
        scheduler = _schedule(optimizer, config)
        seen = []
        for _ in range(10):
            seen.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return seen

    linear, constant = rates("linear"), rates("constant")
    assert linear[:2] == constant[:2] == [1 / 3, 2 / 3]  # the same warm-up (2 steps)
    assert constant[2:] == [1.0] * 8
    assert linear[2:] == [(10 - s) / 8 for s in range(2, 10)]  # decays toward 0 at step 10


def test_weight_decay_spares_the_magnitude_when_asked():
    """With zero gradients AdamW's decoupled decay alone moves a parameter: by lr * wd * p."""
    from dora_analysis.adapters.inject import inject_adapters
    from dora_analysis.training.loop import _optimizer

    torch.manual_seed(0)
    for decay_magnitude in (True, False):
        model = torch.nn.Sequential()
        model.add_module("query", torch.nn.Linear(6, 4))
        inject_adapters(model, method="dora", targets=("query",), r=2, alpha=4)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        config = TrainConfig(
            method="dora", out=Path("x"), lr=0.1, weight_decay=0.5, decay_magnitude=decay_magnitude
        )
        optimizer = _optimizer(named, config)
        before = {n: p.detach().clone() for n, p in named}
        for _, p in named:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        for name, p in named:
            decayed = decay_magnitude or not name.endswith("magnitude")
            expected = before[name] * (1 - 0.1 * 0.5) if decayed else before[name]
            torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0)


def test_magnitude_only_trains_m_alone_and_saves_a_zero_update(tiny_model, tmp_path):
    """--magnitude-only (the paper's Table 6): only m (and the head) train; the saved adapter's update is
    exactly zero, so PEFT and our reader merge it to m W0 / ||W0||_c."""
    from safetensors.torch import load_file

    run = train(
        TrainConfig(method="dora", out=tmp_path / "m", model=tiny_model, magnitude_only=True, **QUICK),
        progress=False,
    )
    record = json.loads((run / "run.json").read_text())
    assert record["config"]["magnitude_only"] is True and record["method"] == "dora"
    saved = load_file(run / "checkpoint-5" / "adapter_model.safetensors")
    factors = [t for k, t in saved.items() if "lora_A" in k or "lora_B" in k]
    assert factors and all(not t.any() for t in factors)
    first = load_file(run / "checkpoint-2" / "adapter_model.safetensors")
    moved = [k for k in saved if "lora_magnitude_vector" in k and not torch.equal(saved[k], first[k])]
    assert moved
