"""Multi-process training under ``torchrun`` (2 processes, gloo on the CPU): DDP and FSDP2 runs equal
the single-process run on the same global batch, and DoRA's magnitude trains in each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_tiny_encoder

from dora_analysis.training import TrainConfig, train

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
ARGS = dict(steps=3, save_every=3, batch_size=8, max_train_examples=32, max_eval_examples=16)
CLI = [
    "--method", "dora", "--steps", "3", "--save-every", "3", "--batch-size", "8", "--dropout", "0",
    "--max-train-examples", "32", "--max-eval-examples", "16", "--optimizer", "sgd", "--lr", "0.1",
    "--threads", "1", "--quiet",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny encoder with every dropout off, so runs on different process counts can agree."""
    folder = save_tiny_encoder(tmp_path_factory.mktemp("tiny-bert-nodrop"))
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def single(tiny_model, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("single") / "run"
    config = TrainConfig(
        method="dora", out=out, model=tiny_model, dropout=0.0, optimizer="sgd", lr=0.1, threads=1, **ARGS
    )
    train(config, progress=False)
    return load_file(out / "checkpoint-3" / "adapter_model.safetensors")


def torchrun(*arguments: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run([*command, *arguments], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def assert_same_run(run: Path, single: dict[str, torch.Tensor], tiny_model: Path, parallel: str) -> None:
    record = json.loads((run / "run.json").read_text())
    assert record["processes"] == 2 and record["parallel"] == parallel and record["status"] == "completed"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-3", "run.json"]  # rank 0 wrote, once
    tensors = load_file(run / "checkpoint-3" / "adapter_model.safetensors")
    assert tensors.keys() == single.keys()
    for name, value in tensors.items():
        torch.testing.assert_close(value, single[name], atol=1e-6, rtol=1e-5, msg=name)
    # the magnitude trained: it left ||W0||_c (B alone moving would be LoRA's training). With SGD
    # on this tiny model the query magnitudes move ~1e-7, the value ones ~1e-5.
    base = load_file(tiny_model / "model.safetensors")
    for name, value in tensors.items():
        if name.endswith("lora_magnitude_vector"):
            weight = base[
                name.removeprefix("base_model.model.bert.").replace("lora_magnitude_vector", "weight")
            ]
            moved = (value.double() - torch.linalg.vector_norm(weight.double(), dim=1)).abs().max()
            ulp = 4 * torch.finfo(torch.float32).eps * value.abs().max()
            assert moved > (1e-6 if ".value." in name else ulp), name


@pytest.mark.slow
def test_torchrun_ddp_equals_single_process(tiny_model, single, tmp_path):
    out = tmp_path / "ddp"
    done = torchrun("-m", "dora_analysis", "train", *CLI, "--model", str(tiny_model), "--out", str(out))
    assert done.stdout.count("checkpoints in") == 1  # only rank 0 reports
    assert_same_run(out, single, tiny_model, "ddp")


@pytest.mark.slow
def test_torchrun_fsdp2_layer_and_train(tiny_model, single, tmp_path):
    out = tmp_path / "fsdp"
    torchrun(str(HERE / "fsdp_worker.py"), *CLI, "--model", str(tiny_model), "--out", str(out))
    assert_same_run(out, single, tiny_model, "fsdp2")
