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
from collections.abc import Callable
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
from dora_analysis.training.data import batch, encode, evaluate, subset, train_batches
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


def _run(
    config: TrainConfig,
    model_path: Path,
    task: TextTask,
    out: Path,
    progress: ProgressCallback | bool,
    ranks: Ranks,
    track: TrackHook | None = None,
) -> Path:
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
    trainable = [p for p in wrapped.parameters() if p.requires_grad]  # DTensors under FSDP2
    optimizer = _optimizer(trainable, config)
    scaler = grad_scaler(device, config.precision)

    def evaluate_here(module: torch.nn.Module) -> dict[str, float]:
        with autocast(device, config.precision):
            return evaluate(module, eval_data, pad_id, device=device)

    warmup = math.ceil(config.warmup_ratio * config.steps)

    def lr_factor(step: int) -> float:  # HF's linear schedule with warm-up
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (config.steps - step) / max(1, config.steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    batches_per_epoch = max(1, len(train_data.ids) // min(config.batch_size, len(train_data.ids)))

    untrained = evaluate_here(shadow if shadow is not None else model) if ranks.main else {}
    log_history: list[dict[str, Any]] = [{"epoch": 0.0, "step": 0, **untrained}]
    run_record: dict[str, Any] = {
        "method": config.method,
        "seed": config.seed,
        "config": config_record(config, model_path),
        "base_model": str(model_path.resolve()),
        "model_class": type(model).__name__,
        "weights_prefix": prefix,
        "weights_file": "model.safetensors" if config.method == "ft" else "adapter_model.safetensors",
        "adapted_modules": adapted,
        "modules_to_save": list(HEAD_MODULES),
        "trainable_parameters": trainable_parameters,
        "total_parameters": total_parameters,
        "task": {
            "name": task.name,
            "labels": list(task.labels),
            "source": task.source,
            "n_train": len(train_data.ids),
            "n_eval": len(eval_data.ids),
            "majority_accuracy": task.majority_accuracy,
        },
        "untrained_accuracy": untrained.get("eval_accuracy"),
        "versions": versions(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "precision": config.precision,
        "processes": ranks.world,
        "parallel": ("fsdp2" if config.fsdp else "ddp") if ranks.distributed else None,
        "status": "running",
        "checkpoints": [],
    }
    if ranks.main:
        write_json(out / RUN_FILE, run_record)

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
    batches = train_batches(len(train_data.ids), config.batch_size, generator)
    wrapped.train()
    track = track if config.track_every else None
    if track is not None:
        track(wrapped, 0)  # every rank: FSDP2 gathers the shards
    started = time.perf_counter()
    losses: list[float] = []
    step = 0
    try:
        for step in range(1, config.steps + 1):
            epoch_index, index = next(batches)
            inputs = batch(train_data, local_slice(index, ranks), pad_id)
            with autocast(device, config.precision):
                loss = wrapped(**{k: v.to(device) for k, v in inputs.items()}).loss
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # clip the true gradients (a no-op without fp16)
            grad_norm = _total(torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm))
            learning_rate = scheduler.get_last_lr()[0]
            scaler.step(optimizer)  # skipped when fp16 gradients overflowed
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_loss = mean_over_ranks(loss, ranks)
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
            if track is not None and (step % config.track_every == 0 or step == config.steps):
                track(wrapped, step)
            if step % config.save_every == 0 or step == config.steps:
                whole = full_model(wrapped, shadow, config.fsdp)  # a collective under FSDP2
                if ranks.main:
                    log_history.append({"epoch": epoch, "step": step, **evaluate_here(whole)})
                    state = trainer_state(config, step, epoch, log_history)
                    save_checkpoint(whole, config, model_path, out, state)
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
        if ranks.main:  # only rank 0 keeps the record
            elapsed = time.perf_counter() - started
            run_record["seconds"] = elapsed
            run_record["seconds_per_step"] = elapsed / max(step, 1)  # includes evaluation and saving
            evals = [e for e in log_history if "eval_accuracy" in e]
            run_record["final_accuracy"] = evals[-1]["eval_accuracy"]
            write_json(out / RUN_FILE, run_record)
    return out
