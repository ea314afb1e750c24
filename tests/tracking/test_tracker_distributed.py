"""The tracker under ``torchrun`` (2 processes, gloo, CPU): DDP and FSDP2 frames equal the
single-process frame of the same training on the same global batch."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_models import tiny_bert_config

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
WORKER = HERE / "tracking_worker.py"


def _worker():
    spec = importlib.util.spec_from_file_location("tracking_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_torchrun_ddp_and_fsdp2_frames_equal_the_single_process_one(tmp_path):
    from transformers import BertForSequenceClassification

    base = tmp_path / "base"
    torch.manual_seed(0)
    config = tiny_bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(config).save_pretrained(base)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*command, str(WORKER), str(base), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    worker = _worker()
    for method in ("ft", "dora"):
        tracker = worker.train_and_track(base, method, "single")
        single = tracker.frame()
        tracker.close()
        assert (
            sorted(set(single["step"])) == [0, 1, 2]
            and (single[single.step == 2]["delta_direction"] > 0).all()
        )
        for mode in ("ddp", "fsdp"):
            other = pd.read_csv(tmp_path / f"{mode}-{method}.csv")
            assert list(other["tensor"]) == list(single["tensor"]), (mode, method)
            assert list(other["step"]) == list(single["step"])
            for column in ("delta_magnitude", "delta_direction"):
                # the same arithmetic up to the order of the gradient all-reduce: float32 rounding
                np.testing.assert_allclose(
                    other[column], single[column], rtol=1e-5, atol=1e-9, err_msg=f"{mode} {method} {column}"
                )
