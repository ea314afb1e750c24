"""Train FT, LoRA or DoRA on a real pre-trained encoder and save a checkpoint series to analyse.

The run folder is laid out as the Hugging Face Trainer's (see :mod:`.checkpoints`). Same config,
same seed, same machine -> byte-identical checkpoints. ``config.device`` / ``config.precision`` pick
where and in which precision it trains; under ``torchrun`` it trains data-parallel or sharded
(see :mod:`.distributed`).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dora_analysis.errors import InputError
from dora_analysis.training.checkpoints import (
    RUN_FILE,
    config_record,
    prepare_out,
    remove_if_empty,
    save_checkpoint,
    trainer_state,
    versions,
    write_json,
)
from dora_analysis.training.config import HEAD_MODULES, TrainConfig, check_config
from dora_analysis.training.data import Encoded, batch, encode, evaluate, subset, train_batches
from dora_analysis.training.distributed import (
    Ranks,
    full_model,
    local_slice,
    mean_over_ranks,
    rank_device,
    start,
    stop,
    unsharded_copy,
    wrap,
)
from dora_analysis.training.model import adapt, load_model, weights_prefix
from dora_analysis.training.precision import autocast, grad_scaler
from dora_analysis.training.tasks import TextTask, load_task

__all__ = ["train", "ProgressCallback"]


def _optimizer(named: list[tuple[str, torch.nn.Parameter]], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (the default, as the paper trains), or SGD with momentum, over the named trainable
    parameters; with ``decay_magnitude`` False, DoRA's magnitudes are in a group without weight decay.

    Adam moves every parameter by about the learning rate per step whatever its gradient's size,
    which shapes how far each magnitude moves; SGD makes the step follow the gradient.
    """
    groups = _decay_groups(named, config)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.learning_rate, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.learning_rate)


def _decay_groups(named: list[tuple[str, torch.nn.Parameter]], config: TrainConfig) -> list[dict]:
    """The parameter groups and their weight decay (``config.weight_decay``; 0 for DoRA's ``magnitude``
    parameters when ``decay_magnitude`` is False)."""
    spared = {n for n, _ in named if not config.decay_magnitude and n.rsplit(".", 1)[-1] == "magnitude"}
    decayed = [p for n, p in named if n not in spared]
    groups = [{"params": decayed, "weight_decay": config.weight_decay}]
    if spared:
        groups.append({"params": [p for n, p in named if n in spared], "weight_decay": 0.0})
    return groups


ProgressCallback = Callable[[int], None]
TrackHook = Callable[[torch.nn.Module, int], None]  # (the model being trained, step): e.g. ΔM/ΔD


def _total(norm: torch.Tensor) -> float:
    """The clipped-over gradient norm as a number (a DTensor under FSDP2 holds it sharded)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def train(
    config: TrainConfig, *, progress: ProgressCallback | bool = True, track: TrackHook | None = None
) -> Path:
    """Train ``config.method`` and write the checkpoint series; returns the run folder.

    Args:
        config: the run (see :class:`TrainConfig`).
        progress: ``True`` shows a tqdm bar on stderr (steps, loss, s/step); ``False`` nothing; a
            callable is called with ``1`` after every step instead (e.g. ``bar.update`` of one bar
            that spans several runs).
        track: called with the model and the step at step 0 and every ``config.track_every`` steps
            (the train command's ``--track-every`` passes a recorder writing ``RUN_DIR/deltas.csv``).

    Returns:
        ``config.out``, holding ``run.json`` and ``checkpoint-<step>/`` folders.

    Raises:
        InputError: a bad option, a model folder that is not one, or a RUN_DIR that already holds a
            run (without ``config.overwrite``).

    Example:
        >>> train(TrainConfig(method="dora", out=Path("runs/dora"), steps=200))  # doctest: +SKIP
    """
    model_path = check_config(config)
    task = load_task(config.task)
    out = Path(config.out)
    ranks = start(config.device)
    try:
        if config.batch_size % ranks.world:
            raise InputError.of(
                "--batch-size",
                f"{config.batch_size} sentences do not split evenly over {ranks.world} processes",
            )
        if config.fsdp and not ranks.distributed:
            raise InputError.of(
                "--fsdp", "shards over processes: start it with torchrun --nproc-per-node N (N >= 2)"
            )
        created = prepare_out(out, config.overwrite) if ranks.main else False
        _barrier(ranks)  # nobody trains into a folder rank 0 has not checked
        threads_before = torch.get_num_threads()
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        try:
            with torch.random.fork_rng(devices=[]):  # seed dropout without touching the caller's RNG
                torch.manual_seed(config.seed)
                return _run(config, model_path, task, out, progress if ranks.main else False, ranks, track)
        except BaseException:
            if created:  # e.g. --targets that match nothing: leave no empty RUN_DIR behind
                remove_if_empty(out)
            raise
        finally:
            torch.set_num_threads(threads_before)
    finally:
        stop(ranks)


def _barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        import torch.distributed as dist

        dist.barrier()


@dataclass
class _Setup:
    """What one run trains with, built once by :func:`_set_up` (one process's view under torchrun)."""

    config: TrainConfig
    model_path: Path
    ranks: Ranks
    device: torch.device
    model: torch.nn.Module  # the unwrapped model (rank 0 evaluates and saves it without FSDP)
    wrapped: torch.nn.Module  # what the steps run: the model, or its DDP/FSDP2 wrapper
    shadow: torch.nn.Module | None  # an unsharded copy under FSDP2, for evaluation and saving
    trainable: list[torch.nn.Parameter]  # DTensors under FSDP2
    optimizer: torch.optim.Optimizer
    scaler: Any  # torch.amp.GradScaler (a no-op without fp16)
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train_data: Encoded
    eval_data: Encoded
    pad_id: int
    weights_prefix: str
    adapted: list[str]
    total_parameters: int
    trainable_parameters: int


@dataclass
class _State:
    """What changes as the run goes: the step, the losses since the last log, the log history."""

    log_history: list[dict[str, Any]]
    step: int = 0
    losses: list[float] = field(default_factory=list)
    started: float = 0.0


def _run(
    config: TrainConfig,
    model_path: Path,
    task: TextTask,
    out: Path,
    progress: ProgressCallback | bool,
    ranks: Ranks,
    track: TrackHook | None = None,
) -> Path:
    """Set up, evaluate the untrained model, write run.json, then train (see :func:`_train_steps`)."""
    setup = _set_up(config, model_path, task, ranks)
    untrained = (
        _evaluate(setup, setup.shadow if setup.shadow is not None else setup.model) if ranks.main else {}
    )
    state = _State(log_history=[{"epoch": 0.0, "step": 0, **untrained}])
    record = _run_record(setup, model_path, task, untrained)
    if ranks.main:
        write_json(out / RUN_FILE, record)
    bar = _progress_bar(config) if progress is True else None
    batches = train_batches(
        len(setup.train_data.ids), config.batch_size, torch.Generator().manual_seed(config.seed)
    )
    setup.wrapped.train()
    track = track if config.track_every else None
    if track is not None:
        track(setup.wrapped, 0)  # every rank: FSDP2 gathers the shards
    state.started = time.perf_counter()
    try:
        _train_steps(setup, state, record, out, batches, _reporter(bar, progress, state), track)
    except KeyboardInterrupt:
        record.update(status="interrupted", interrupted_at_step=state.step)
        raise
    else:
        record["status"] = "completed"
    finally:
        if bar is not None:
            bar.close()
        if ranks.main:  # only rank 0 keeps the record
            _finish_record(record, state)
            write_json(out / RUN_FILE, record)
    return out


def _set_up(config: TrainConfig, model_path: Path, task: TextTask, ranks: Ranks) -> _Setup:
    """Tokenize the task, load and adapt the model, wrap it for the ranks, make the optimizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_data = encode(
        tokenizer, *subset(task.train_texts, task.train_labels, config.max_train_examples), config.max_length
    )
    eval_data = encode(
        tokenizer, *subset(task.eval_texts, task.eval_labels, config.max_eval_examples), config.max_length
    )
    device = rank_device(config.device, ranks)
    model = load_model(model_path, len(task.labels), config.seed)
    prefix = weights_prefix(model)
    adapted = adapt(model, config)
    model.to(device)
    total_parameters = sum(p.numel() for p in model.parameters())
    trainable_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shadow = unsharded_copy(model, ranks) if config.fsdp else None  # rank 0 evaluates and saves it
    wrapped = wrap(model, ranks, config.fsdp, device)
    named = [(n, p) for n, p in wrapped.named_parameters() if p.requires_grad]  # DTensors under FSDP2
    trainable = [p for _, p in named]
    optimizer = _optimizer(named, config)
    scaler = grad_scaler(device, config.precision)
    return _Setup(
        config,
        model_path,
        ranks,
        device,
        model,
        wrapped,
        shadow,
        trainable,
        optimizer,
        scaler,
        _schedule(optimizer, config),
        train_data,
        eval_data,
        pad_id,
        prefix,
        adapted,
        total_parameters,
        trainable_parameters,
    )


def _schedule(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Hugging Face's linear schedule with warm-up, or (``schedule="constant"``) warm-up then the peak rate."""
    warmup = math.ceil(config.warmup_ratio * config.steps)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.schedule == "constant":
            return 1.0
        return max(0.0, (config.steps - step) / max(1, config.steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def _evaluate(setup: _Setup, module: torch.nn.Module) -> dict[str, float]:
    """Held-out loss and accuracy of ``module``, in the run's precision."""
    with autocast(setup.device, setup.config.precision):
        return evaluate(module, setup.eval_data, setup.pad_id, device=setup.device)


def _run_record(
    setup: _Setup, model_path: Path, task: TextTask, untrained: dict[str, float]
) -> dict[str, Any]:
    """run.json as written before the first step (``status`` running, no checkpoints yet)."""
    config, ranks = setup.config, setup.ranks
    return {
        "method": config.method,
        "seed": config.seed,
        "config": config_record(config, model_path),
        "base_model": str(model_path.resolve()),
        "model_class": type(setup.model).__name__,
        "weights_prefix": setup.weights_prefix,
        "weights_file": "model.safetensors" if config.method == "ft" else "adapter_model.safetensors",
        "adapted_modules": setup.adapted,
        "modules_to_save": list(HEAD_MODULES),
        "trainable_parameters": setup.trainable_parameters,
        "total_parameters": setup.total_parameters,
        "task": {
            "name": task.name,
            "labels": list(task.labels),
            "source": task.source,
            "n_train": len(setup.train_data.ids),
            "n_eval": len(setup.eval_data.ids),
            "majority_accuracy": task.majority_accuracy,
        },
        "untrained_accuracy": untrained.get("eval_accuracy"),
        "versions": versions(),
        "torch_threads": torch.get_num_threads(),
        "device": str(setup.device),
        "precision": config.precision,
        "processes": ranks.world,
        "parallel": ("fsdp2" if config.fsdp else "ddp") if ranks.distributed else None,
        "status": "running",
        "checkpoints": [],
    }


def _progress_bar(config: TrainConfig):
    from tqdm.auto import tqdm

    return tqdm(
        total=config.steps, desc=f"train {config.method}", unit="step", file=sys.stderr, dynamic_ncols=True
    )


def _train_steps(
    setup: _Setup,
    state: _State,
    record: dict[str, Any],
    out: Path,
    batches: Iterator[tuple[int, Any]],
    report: Callable[[float], None],
    track: TrackHook | None = None,
) -> None:
    """Every optimizer step; a log entry every ``log_every``, ``track`` every ``track_every`` and a
    checkpoint every ``save_every`` steps.

    ``batches`` yields ``(epoch, batch index)``; ``report`` is called with each step's loss.
    """
    config = setup.config
    batches_per_epoch = max(1, len(setup.train_data.ids) // min(config.batch_size, len(setup.train_data.ids)))
    for step in range(1, config.steps + 1):
        state.step = step
        epoch_index, index = next(batches)
        step_loss, grad_norm, learning_rate = _optimizer_step(setup, index)
        state.losses.append(step_loss)
        epoch = round(epoch_index + (step % batches_per_epoch or batches_per_epoch) / batches_per_epoch, 4)
        if step % config.log_every == 0 or step == config.steps:
            _log_losses(state, epoch, grad_norm, learning_rate)
        if track is not None and (step % config.track_every == 0 or step == config.steps):
            track(setup.wrapped, step)
        if step % config.save_every == 0 or step == config.steps:
            _save(setup, state, record, out, epoch)
        report(step_loss)


def _optimizer_step(setup: _Setup, index) -> tuple[float, float, float]:
    """One step on the batch ``index``: ``(loss averaged over the ranks, gradient norm, learning rate)``."""
    config, device = setup.config, setup.device
    inputs = batch(setup.train_data, local_slice(index, setup.ranks), setup.pad_id)
    with autocast(device, config.precision):
        loss = setup.wrapped(**{k: v.to(device) for k, v in inputs.items()}).loss
    setup.scaler.scale(loss).backward()
    setup.scaler.unscale_(setup.optimizer)  # clip the true gradients (a no-op without fp16)
    grad_norm = _total(torch.nn.utils.clip_grad_norm_(setup.trainable, config.max_grad_norm))
    learning_rate = setup.scheduler.get_last_lr()[0]
    setup.scaler.step(setup.optimizer)  # skipped when fp16 gradients overflowed
    setup.scaler.update()
    setup.scheduler.step()
    setup.optimizer.zero_grad(set_to_none=True)
    return mean_over_ranks(loss, setup.ranks), grad_norm, learning_rate


def _log_losses(state: _State, epoch: float, grad_norm: float, learning_rate: float) -> None:
    """A training log entry: the mean loss since the last one, the gradient norm, the learning rate."""
    state.log_history.append(
        {
            "epoch": epoch,
            "step": state.step,
            "loss": sum(state.losses) / len(state.losses),
            "grad_norm": grad_norm,
            "learning_rate": learning_rate,
        }
    )
    state.losses = []


def _save(setup: _Setup, state: _State, record: dict[str, Any], out: Path, epoch: float) -> None:
    """Evaluate and write ``checkpoint-<step>`` (rank 0; gathering the model is a collective under FSDP2)."""
    config = setup.config
    whole = full_model(setup.wrapped, setup.shadow, config.fsdp)  # a collective under FSDP2
    if setup.ranks.main:
        state.log_history.append({"epoch": epoch, "step": state.step, **_evaluate(setup, whole)})
        trainer = trainer_state(config, state.step, epoch, state.log_history)
        save_checkpoint(whole, config, setup.model_path, out, trainer)
        record["checkpoints"].append(state.step)


def _reporter(bar, progress: ProgressCallback | bool, state: _State) -> Callable[[float], None]:
    """What follows each step: the tqdm ``bar``'s postfix (loss, seconds per step) and count, else the
    caller's ``progress`` callback with 1, else nothing."""

    def report(step_loss: float) -> None:
        if bar is not None:
            seconds = (time.perf_counter() - state.started) / state.step
            bar.set_postfix(loss=f"{step_loss:.3f}", s_per_step=f"{seconds:.2f}", refresh=False)
            bar.update(1)
        elif callable(progress):
            progress(1)

    return report


def _finish_record(record: dict[str, Any], state: _State) -> None:
    """The run's time and final held-out accuracy, added to ``record`` however the run ended."""
    elapsed = time.perf_counter() - state.started
    record["seconds"] = elapsed
    record["seconds_per_step"] = elapsed / max(state.step, 1)  # includes evaluation and saving
    evals = [e for e in state.log_history if "eval_accuracy" in e]
    record["final_accuracy"] = evals[-1]["eval_accuracy"]
