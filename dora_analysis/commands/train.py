"""Train FT, LoRA or DoRA on a pre-trained encoder and save checkpoint-<step>/ folders to analyse.

The default model is the packaged all-MiniLM-L6-v2 and the default task classifies sentences of
Python's own documentation (pydoc_data.topics) by topic; nothing is downloaded.
"""

from __future__ import annotations

import argparse

from dora_analysis.commands.options import (
    add_model_argument,
    add_overwrite_argument,
    add_quiet_argument,
    add_seed_argument,
    add_threads_argument,
    at_least,
    fraction,
    output_folder,
    positive_float,
    require_module,
)

__all__ = ["add_arguments", "run"]


def _targets(value: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in value.split(",") if part.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated module names, e.g. query,value")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # In this order in --help: the run, the adapters, the optimisation and data, where it runs.
    _add_run_arguments(parser)
    _add_adapter_arguments(parser)
    _add_optimizer_arguments(parser)
    _add_execution_arguments(parser)


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """``--method``, ``--out``, ``--model``, ``--task``, ``--steps``, ``--save-every``."""
    from dora_analysis.training.tasks import DEFAULT_TASK, TASKS

    parser.add_argument(
        "--method",
        required=True,
        choices=("ft", "lora", "dora"),
        help="ft: every weight; lora/dora: adapters on --targets (the classifier head trains in all three)",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=output_folder,
        metavar="RUN_DIR",
        help="folder for run.json and checkpoint-<step>/",
    )
    add_model_argument(parser)
    parser.add_argument("--task", default=DEFAULT_TASK, choices=sorted(TASKS), help=f"default {DEFAULT_TASK}")
    parser.add_argument("--steps", type=at_least(1), default=200, help="optimizer steps (default 200)")
    parser.add_argument(
        "--save-every",
        type=at_least(1),
        default=25,
        metavar="K",
        help="save and evaluate every K steps and at the end (default 25)",
    )


def _add_adapter_arguments(parser: argparse.ArgumentParser) -> None:
    """``--rank``, ``--alpha``, ``--dropout``, ``--targets``, ``--rslora`` (LoRA/DoRA only)."""
    parser.add_argument("--rank", type=at_least(1), default=8, help="LoRA/DoRA rank r (default 8)")
    parser.add_argument("--alpha", type=positive_float, default=16.0, help="LoRA/DoRA alpha (default 16)")
    parser.add_argument("--dropout", type=fraction, default=0.05, help="adapter input dropout (default 0.05)")
    parser.add_argument(
        "--targets",
        type=_targets,
        default=("query", "value"),
        metavar="NAMES",
        help="comma-separated Linear module names to adapt (default query,value)",
    )
    parser.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(r) instead of alpha/r")
    parser.add_argument(
        "--no-detach-norm",
        dest="detach_norm",
        action="store_false",
        help="DoRA: keep the gradient through ||W0 + sBA||_c (the paper detaches it, Section 4.3)",
    )
    parser.add_argument(
        "--magnitude-only",
        action="store_true",
        help="DoRA: train the magnitude m alone, no A/B (the paper's Table 6)",
    )


def _add_optimizer_arguments(parser: argparse.ArgumentParser) -> None:
    """``--lr``, ``--optimizer``, ``--momentum``, the batch, the sentences and the seed."""
    parser.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help="peak learning rate (AdamW default 1e-4 for ft, 3e-3 for lora and dora; SGD: required)",
    )
    parser.add_argument(
        "--optimizer",
        choices=("adamw", "sgd"),
        default="adamw",
        help="adamw (default) or sgd with --momentum (SGD needs --lr)",
    )
    parser.add_argument("--momentum", type=fraction, default=0.9, help="SGD momentum (default 0.9)")
    parser.add_argument(
        "--schedule",
        choices=("linear", "constant"),
        default="linear",
        help="after the 10%% warm-up: linear decay to 0 (default) or the constant peak rate",
    )
    parser.add_argument(
        "--weight-decay",
        type=fraction,
        default=0.0,
        help="decoupled weight decay (AdamW) / L2 (SGD) on every trainable parameter (default 0)",
    )
    parser.add_argument(
        "--no-decay-magnitude",
        dest="decay_magnitude",
        action="store_false",
        help="DoRA: no weight decay on the magnitude m (decay pulls m toward 0, not toward ||W0||_c)",
    )
    parser.add_argument("--batch-size", type=at_least(1), default=8, help="default 8")
    parser.add_argument("--max-length", type=at_least(1), default=32, help="tokens per sentence (default 32)")
    add_seed_argument(parser)
    parser.add_argument(
        "--max-train-examples", type=at_least(1), default=None, metavar="N", help="train on a fixed subset"
    )
    parser.add_argument(
        "--max-eval-examples", type=at_least(1), default=None, metavar="N", help="evaluate on a fixed subset"
    )


def _add_execution_arguments(parser: argparse.ArgumentParser) -> None:
    """``--threads``, ``--overwrite``, ``--device``, ``--precision``, ``--fsdp``, ``--quiet``."""
    add_threads_argument(parser)
    add_overwrite_argument(parser, "replace the checkpoints already in RUN_DIR")
    parser.add_argument(
        "--device",
        default="cpu",  # checked by the trainer (training/precision.py), which knows no analysis
        metavar="DEVICE",
        help="train on this torch device, e.g. cuda (under torchrun: each process's own GPU); default cpu",
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="fp32 (default), or autocast to bf16 / fp16 (fp16 with loss scaling); weights stay fp32",
    )
    parser.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard the model with FSDP2 (fully_shard) instead of data-parallel DDP",
    )
    parser.add_argument(
        "--track-every",
        type=at_least(1),
        default=None,
        metavar="N",
        help="record ΔM and ΔD of the live model at step 0 and every N steps into RUN_DIR/deltas.csv",
    )
    add_quiet_argument(parser)


def run(args: argparse.Namespace) -> int:
    import os

    require_module("transformers")  # the [train] extra: say so before RUN_DIR is touched
    from dora_analysis.training import TrainConfig, default_model_path, train

    config = TrainConfig(
        method=args.method,
        out=args.out,
        model=args.model,
        task=args.task,
        steps=args.steps,
        save_every=args.save_every,
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        targets=args.targets,
        rslora=args.rslora,
        lr=args.lr,
        optimizer=args.optimizer,
        momentum=args.momentum,
        schedule=args.schedule,
        weight_decay=args.weight_decay,
        decay_magnitude=args.decay_magnitude,
        detach_norm=args.detach_norm,
        magnitude_only=args.magnitude_only,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        max_train_examples=args.max_train_examples,
        max_eval_examples=args.max_eval_examples,
        threads=args.threads,
        overwrite=args.overwrite,
        device=args.device,
        precision=args.precision,
        fsdp=args.fsdp,
        track_every=args.track_every,
    )
    from dora_analysis.tracking.recorder import DELTAS_FILE, DeltasRecorder

    track = None
    if args.track_every:  # the base read from its folder: its names in the rows, as analyze_series
        base = args.model or default_model_path()
        track = DeltasRecorder(args.out / DELTAS_FILE, method=args.method, base=base)
    try:
        out = train(config, progress=not args.quiet, track=track)
    finally:
        if track is not None:
            track.close()
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 reports
        return 0
    from dora_analysis.readers.runs import read_run_record

    record = read_run_record(out)
    print(
        f"{record['method']}: {len(record['checkpoints'])} checkpoints in {out}; held-out accuracy "
        f"{record['untrained_accuracy']:.3f} (untrained head) -> {record['final_accuracy']:.3f} "
        f"at step {record['checkpoints'][-1]}; {record['seconds_per_step']:.2f} s/step"
    )
    return 0
