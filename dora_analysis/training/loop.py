"""Train FT, LoRA or DoRA on a real pre-trained encoder and save a checkpoint series to analyse.

The run folder is laid out as the Hugging Face Trainer's (see :mod:`.checkpoints`). Same config,
same seed, same machine -> byte-identical checkpoints.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dora_analysis.training.checkpoints import (
    RUN_FILE,
    config_record,
    prepare_out,
    save_checkpoint,
    trainer_state,
    versions,
    write_json,
)
from dora_analysis.training.config import HEAD_MODULES, TrainConfig, check_config
from dora_analysis.training.data import batch, encode, evaluate, subset, train_batches
from dora_analysis.training.model import adapt, load_model, weights_prefix
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
    model_path = check_config(config)
    task = load_task(config.task)
    out = Path(config.out)
    prepare_out(out, config.overwrite)
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
    train_data = encode(
        tokenizer, *subset(task.train_texts, task.train_labels, config.max_train_examples), config.max_length
    )
    eval_data = encode(
        tokenizer, *subset(task.eval_texts, task.eval_labels, config.max_eval_examples), config.max_length
    )

    model = load_model(model_path, len(task.labels), config.seed)
    prefix = weights_prefix(model)
    adapted = adapt(model, config)
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
        "config": config_record(config, model_path),
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
        "versions": versions(),
        "torch_threads": torch.get_num_threads(),
        "status": "running",
        "checkpoints": [],
    }
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
    model.train()
    started = time.perf_counter()
    losses: list[float] = []
    step = 0
    try:
        for step in range(1, config.steps + 1):
            epoch_index, index = next(batches)
            loss = model(**batch(train_data, index, pad_id)).loss
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
                state = trainer_state(config, step, epoch, log_history)
                save_checkpoint(model, config, model_path, out, state)
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
        write_json(out / RUN_FILE, run_record)
    return out
