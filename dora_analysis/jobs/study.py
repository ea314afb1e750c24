"""When does the paper's sign appear? Train a grid of runs, analyse each series every way, summarise.

The grid varies one factor at a time from a base configuration (all on the default MiniLM task), each
factor one thing: the checkpoint window (of the base run, whose rate decays linearly to 0, so its late
checkpoints are an annealing phase), training longer at a constant rate (6x the steps), learning rate,
weight decay (for DoRA also with its magnitude spared), optimizer, targets and rank, DoRA with the
norm's gradient kept (not detached) and DoRA training its magnitude alone; for FT, LoRA and DoRA where
the factor applies, and for several seeds. Every run's checkpoints are measured in each convention of
:mod:`dora_analysis.analysis.conventions`, and the correlation of ΔM on ΔD is reported per
configuration, method, module, convention and window, beside the correlation of the step-to-step
increments and the row-by-row correlation within each matrix (:mod:`dora_analysis.analysis.coupling`).

Layout of the output folder::

    OUT/runs/<cell>/<method>-seed<k>/   one training run (run.json + checkpoint-<step>/)
    OUT/points.csv                      one row per (cell, run, convention, step, tensor): ΔM, ΔD
    OUT/study.csv                       one row per (cell, window, method, module, convention)
    OUT/row_coupling.csv                one row per (cell, run, step, tensor): r over the matrix's rows
    OUT/row_coupling_steps.csv          one row per (cell, method, module, step): that r pooled, interval
    OUT/figures/sign_map_<module>.png   r by configuration and convention, one panel per method
    OUT/figures/row_coupling_<cell>.png the row-by-row r over the steps, per method and module
    OUT/report.md                       the summary
"""

from __future__ import annotations

import dataclasses
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from dora_analysis.errors import InputError
from dora_analysis.readers.runs import read_run_record
from dora_analysis.schema import CORRELATION_COLUMNS, METHODS
from dora_analysis.training.checkpoints import is_completed_run

if TYPE_CHECKING:
    import torch

    from dora_analysis.readers.base import LowRankUpdate

__all__ = ["Cell", "StudyConfig", "StudyPlan", "study_plan", "run_study", "study_summary", "RESULT_FILES"]

RESULT_FILES = (
    "report.md",
    "study.csv",
    "points.csv",
    "row_coupling.csv",
    "row_coupling_steps.csv",
    "figures",
)
MODULES = ("query", "value")  # the paper's Figures 2 and 7
ADAPTER_METHODS = ("lora", "dora")


@dataclass(frozen=True)
class Cell:
    """One configuration of the grid: a factor at one value, everything else as in the base."""

    name: str  # a short folder-safe name, e.g. "wd-0.1"
    factor: str  # what varies: "base", "learning rate", "weight decay", "optimizer", "targets", "rank"
    value: str  # its value, as shown in the report
    overrides: dict = field(default_factory=dict)  # TrainConfig fields that differ from the base
    methods: tuple[str, ...] = METHODS
    lr_by_method: dict = field(default_factory=dict)  # a learning rate per method, where it differs
    steps: int | None = None  # its own length (None: the plan's), with ``save_every`` and ``window``
    save_every: int | None = None
    window: tuple[int, ...] | None = None  # its "paper" window where it trains longer


@dataclass(frozen=True)
class StudyPlan:
    """The grid and schedule the study trains and the checkpoint windows it analyses."""

    cells: tuple[Cell, ...]
    seeds: tuple[int, ...]
    steps: int
    save_every: int
    windows: dict[str, tuple[int, ...]]  # name -> steps; "paper" (3 intermediate + final) for every cell
    base_only_windows: tuple[str, ...]  # windows analysed for the base cell only
    train: dict  # TrainConfig fields shared by every run (max_length, example limits)


@dataclass
class StudyConfig:
    """The study job."""

    out: Path = Path("dora_study")
    quick: bool = False  # a small grid of short runs (a few minutes), to try it or test it
    overwrite: bool = False  # replace the results (not the runs) of an earlier study in ``out``
    model: Path | None = None  # local encoder folder; None: the packaged all-MiniLM-L6-v2
    device: str | None = None  # where the runs train and the analysis runs (e.g. "cuda"); None: the CPU
    seeds: tuple[int, ...] | None = None  # None: the plan's
    threads: int | None = None  # torch CPU threads while training


def study_plan(quick: bool = False, seeds: tuple[int, ...] | None = None) -> StudyPlan:
    """The grid: the base configuration and one cell per factor value.

    The full grid is 11 configurations (75 runs: 66 of 160 steps with 8 checkpoints each, and 9 of
    960 steps at a constant rate with 8 checkpoints, about 90 minutes on 2 CPU cores); ``quick`` is
    the base, one weight-decay cell and DoRA with its magnitude spared, 2 seeds, 8 steps.
    """
    base = Cell("base", "base", "AdamW, default lr, wd 0, query/value, r 8")
    spared = Cell(
        "wd-0.1-not-m",
        "weight decay",
        "0.1, not on m",
        {"weight_decay": 0.1, "decay_magnitude": False},
        ("dora",),
    )
    if quick:
        cells = (base, Cell("wd-0.1", "weight decay", "0.1", {"weight_decay": 0.1}), spared)
        steps, every = 8, 2
        windows = {"paper": (2, 4, 6, 8), "early": (2, 4), "late": (6, 8)}
        train = {"max_length": 16, "max_train_examples": 48, "max_eval_examples": 24}
        return StudyPlan(cells, seeds or (0, 1), steps, every, windows, ("early", "late"), train)
    all_linear = ("query", "key", "value", "dense")  # every Linear of BERT's blocks (and the pooler)
    cells = (
        base,
        Cell("lr-x3", "learning rate", "x3", lr_by_method={"ft": 3e-4, "lora": 1e-2, "dora": 1e-2}),
        Cell("wd-0.01", "weight decay", "0.01", {"weight_decay": 0.01}),
        Cell("wd-0.1", "weight decay", "0.1", {"weight_decay": 0.1}),
        Cell(
            "sgd",
            "optimizer",
            "SGD, momentum 0.9",
            {"optimizer": "sgd"},
            lr_by_method={"ft": 0.01, "lora": 0.1, "dora": 0.1},
        ),
        Cell("targets-all", "targets", "all linear", {"targets": all_linear}, ADAPTER_METHODS),
        Cell("rank-32", "rank", "32 (alpha 64)", {"rank": 32, "alpha": 64.0}, ADAPTER_METHODS),
        Cell(
            "constant-x6",
            "training length",
            "6x steps, constant rate",
            {"schedule": "constant"},
            steps=960,
            save_every=120,
            window=(240, 480, 720, 960),
        ),
        spared,
        Cell("no-detach", "norm gradient", "kept (not detached)", {"detach_norm": False}, ("dora",)),
        Cell("magnitude-only", "trained", "magnitude only", {"magnitude_only": True}, ("dora",)),
    )
    windows = {"paper": (40, 80, 120, 160), "early": (20, 40, 60, 80), "late": (100, 120, 140, 160)}
    return StudyPlan(cells, seeds or (0, 1, 2), 160, 20, windows, ("early", "late"), {"max_length": 32})


def _check_out(config: StudyConfig) -> None:
    if config.out.exists() and not config.out.is_dir():
        raise InputError.of(config.out, "exists and is not a folder")
    existing = [config.out / n for n in RESULT_FILES if (config.out / n).exists()]
    if existing and not config.overwrite:
        raise InputError.of(
            config.out,
            f"already holds study results ({existing[0].name}, ...); pass --overwrite to replace them",
        )


def _run_dir(out: Path, cell: Cell, method: str, seed: int) -> Path:
    return out / "runs" / cell.name / f"{method}-seed{seed}"


def run_study(config: StudyConfig, progress: bool = True) -> pd.DataFrame:
    """Train the grid (reusing completed runs), analyse it, write study.csv, figures and report.md.

    Returns:
        The study table (``study.csv``).
    Raises:
        InputError: ``config.out`` already holds results and ``config.overwrite`` is False.
    """
    config = dataclasses.replace(config, out=Path(config.out))
    plan = study_plan(config.quick, config.seeds)
    _check_out(config)
    runs, trained = _train_grid(config, plan, progress)
    analysed = time.perf_counter()
    points = study_points(runs, plan, device=config.device, progress=progress)
    coupling = study_row_coupling(runs, device=config.device)
    table = study_table(points, plan, coupling)
    timing = _timing([run for *_, run in runs], trained, time.perf_counter() - analysed)
    _write_results(config, plan, points, table, timing, coupling)
    return table


def _train_grid(
    config: StudyConfig, plan: StudyPlan, progress: bool
) -> tuple[list[tuple[Cell, str, int, Path]], int]:
    """``([(cell, method, seed, run folder)], how many were trained)``: completed runs are reused."""
    from tqdm.auto import tqdm

    jobs = [(c, m, s) for c in plan.cells for m in c.methods for s in plan.seeds]
    bar = tqdm(
        total=sum(c.steps or plan.steps for c, _, _ in jobs),
        desc="study: train",
        unit="step",
        file=sys.stderr,
        disable=not progress,
    )
    runs: list[tuple[Cell, str, int, Path]] = []
    trained = 0
    try:
        for cell, method, seed in jobs:
            run = _run_dir(config.out, cell, method, seed)
            if not is_completed_run(run, cell.steps or plan.steps):
                trained += 1
                _train_one(config, plan, cell, method, seed, run, bar.update)
            else:
                bar.update(cell.steps or plan.steps)
            runs.append((cell, method, seed, run))
    finally:
        bar.close()
    return runs, trained


def _train_one(
    config: StudyConfig, plan: StudyPlan, cell: Cell, method: str, seed: int, run: Path, progress
) -> None:
    """One run of the grid into ``run`` (replacing an incomplete one), its live ΔM/ΔD recorded four times
    between checkpoints into ``run/deltas.csv`` (the dense trajectory between them)."""
    from dora_analysis.tracking.recorder import DELTAS_FILE, DeltasRecorder
    from dora_analysis.training import TrainConfig, default_model_path, train

    every = cell.save_every or plan.save_every
    train_config = TrainConfig(
        method=method,
        out=run,
        model=config.model,
        steps=cell.steps or plan.steps,
        save_every=every,
        seed=seed,
        threads=config.threads,
        lr=cell.lr_by_method.get(method),
        device=config.device or "cpu",
        overwrite=True,  # only an incomplete run of ours is ever here
        track_every=max(1, every // 4),
        **{**plan.train, **cell.overrides},
    )
    track = DeltasRecorder(run / DELTAS_FILE, method=method, base=config.model or default_model_path())
    try:
        train(train_config, progress=progress, track=track)
    finally:
        track.close()


def _timing(runs: list[Path], trained: int, analysis_seconds: float) -> str:
    """What the study cost: the runs' own training times (from their run.json, so reused runs count
    too) and this call's analysis."""
    seconds = 0.0
    for run in runs:
        try:
            seconds += float(read_run_record(run).get("seconds", 0.0))
        except (TypeError, ValueError):
            pass
    reused = len(runs) - trained
    return (
        f"Training {len(runs)} runs took {seconds / 60:.1f} min of their own recorded time"
        + (f" ({reused} reused from an earlier call)" if reused else "")
        + f"; the analysis {analysis_seconds / 60:.1f} min"
    )


def study_points(
    runs: list[tuple[Cell, str, int, Path]],
    plan: StudyPlan,
    device: str | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """ΔM and ΔD of every run's checkpoints in every convention, one row per (run, convention, step, tensor).

    The ``paper`` convention comes from the toolkit's own analysis (:func:`~dora_analysis.analyze_series`);
    the others are measured on the same merged weights, in float64, by
    :func:`~dora_analysis.analysis.conventions.convention_deltas`.
    """
    from dora_analysis.analysis.series import analyze_series
    from dora_analysis.schema import select_modules

    frames = []
    for cell, method, seed, run in runs:
        series = analyze_series(None, [run], method=method, include=_module_pattern(), device=device)
        series = select_modules(series, MODULES)  # attention.self.query -> query, as the paper names it
        series = series.assign(cell=cell.name, factor=cell.factor, value=cell.value, seed=seed)
        frames.append(series.assign(convention="paper"))
        frames.append(_other_conventions(series, run))
    return pd.concat(frames, ignore_index=True)


def study_row_coupling(runs: list[tuple[Cell, str, int, Path]], device: str | None = None) -> pd.DataFrame:
    """Within every matrix and checkpoint of every run, the correlation over its rows of the magnitude
    change with the direction change (:func:`~dora_analysis.analysis.coupling.row_coupling`), in the
    paper's convention."""
    from dora_analysis.analysis.coupling import row_coupling
    from dora_analysis.analysis.series import analyze_series
    from dora_analysis.schema import select_modules

    frames = []
    for cell, method, seed, run in runs:
        rows = analyze_series(
            None, [run], method=method, include=_module_pattern(), device=device, per_row=True
        )
        coupling = row_coupling(select_modules(rows, MODULES))
        frames.append(coupling.assign(cell=cell.name, seed=seed))
    return pd.concat(frames, ignore_index=True)


def study_row_steps(coupling: pd.DataFrame) -> pd.DataFrame:
    """The row-by-row r of ``coupling`` (:func:`study_row_coupling`) pooled per (cell, method, module,
    step) over the layers and seeds, with its delete-one-layer jackknife interval
    (:func:`~dora_analysis.analysis.coupling.row_coupling_summary`): what the per-row figure draws."""
    from dora_analysis.analysis.coupling import row_coupling_summary
    from dora_analysis.schema import ROW_SUMMARY_COLUMNS

    frames = [
        row_coupling_summary(part.assign(run=part["run"].astype(str))).assign(cell=cell)
        for cell, part in coupling.groupby("cell", sort=False)
    ]
    return pd.concat(frames, ignore_index=True)[["cell", *ROW_SUMMARY_COLUMNS]]


def _module_pattern() -> str:
    return r"(^|\.)(" + "|".join(MODULES) + r")\.weight$"


def _other_conventions(series: pd.DataFrame, run: Path) -> pd.DataFrame:
    """The non-paper conventions for every row of one run's ``series`` (same steps and tensors).

    Tensor-major, as the analysis itself: each base tensor is read once for all of the run's
    checkpoints (adapters merge over it through the reusing reader); rows keep ``series``' order.
    """
    from dora_analysis.analysis.planning import select_tensors
    from dora_analysis.readers import open_checkpoint
    from dora_analysis.readers.reuse import ReusingReader

    rows: list[tuple[int, int, int, dict]] = []  # (checkpoint rank, series position, convention, row)
    order = {c: rank for rank, c in enumerate(dict.fromkeys(series["checkpoint"]))}
    with open_checkpoint(_base_of(run, series["method"].iloc[0])) as opened, ExitStack() as stack:
        base = ReusingReader(opened)
        tuned = {c: stack.enter_context(open_checkpoint(Path(c), base=base)) for c in order}
        pairs = {c: select_tensors(base, r, include=_module_pattern()).pairs for c, r in tuned.items()}
        for tensor, part in series.reset_index(drop=True).groupby("tensor", sort=False):
            w0 = base.get(tensor)  # ``tensor`` is the base's name
            for position, row in zip(part.index, part.itertuples(index=False), strict=True):
                measured = _convention_deltas(w0, tuned[row.checkpoint], pairs[row.checkpoint][tensor])
                for k, (convention, dm, dd) in enumerate(measured):
                    record = {
                        **row._asdict(),
                        "convention": convention,
                        "delta_magnitude": dm,
                        "delta_direction": dd,
                    }
                    rows.append((order[row.checkpoint], position, k, record))
    rows.sort(key=lambda item: item[:3])
    return pd.DataFrame([r for *_, r in rows], columns=[*series.columns, "convention"])


def _convention_deltas(w0: torch.Tensor, reader, name: str) -> list[tuple[str, float, float]]:
    """``(convention, ΔM, ΔD)`` of tensor ``name`` of ``reader`` against ``w0`` ``(out, in)``, for every
    convention but ``paper`` (which the analysis itself measured)."""
    from dora_analysis.analysis.conventions import CONVENTIONS, convention_deltas

    update, scaled = reader.low_rank(name), reader.get(name)
    return [
        (convention, *convention_deltas(w0, _convention_weight(w0, scaled, update, convention), convention))
        for convention in CONVENTIONS[1:]
    ]


def _convention_weight(
    w0: torch.Tensor, scaled: torch.Tensor, update: LowRankUpdate | None, convention: str
) -> torch.Tensor:
    """The tuned weight ``convention`` measures: ``scaled`` (the checkpoint's weight, LoRA/DoRA merged
    with ``α/r``), or for a convention that merges without the scale, ``update`` merged over ``w0``
    again with scale 1. A dense (FT) weight has no update: every convention measures ``scaled``.
    """
    from dora_analysis.analysis.conventions import MERGE_SCALED
    from dora_analysis.factors import merge_low_rank

    if update is None or MERGE_SCALED[convention]:
        return scaled
    return merge_low_rank(w0, dataclasses.replace(update, scale=1.0))


def _base_of(run: Path, method: str) -> Path:
    """The base model ``run``'s checkpoints name (its run.json's ``base_model``)."""
    from dora_analysis.readers.runs import named_base, run_checkpoints

    first = run_checkpoints(run, method=method)[0]
    base = named_base(first.path, first.run_dir)
    if base is None:
        raise InputError.of(run, "names no base model (run.json's base_model)")
    return Path(base)


def study_table(points: pd.DataFrame, plan: StudyPlan, coupling: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (cell, window, method, module, convention): pooled r over seeds and its spread.

    ``r``, ``spearman``, ``slope``, ``r_within_step`` and ``r_within_layer`` and their intervals
    (``*_low``/``*_high``: the delete-one-layer jackknife, a layer index left out of every seed at
    once; ``interval`` says which, ``interval_note`` why one is missing) come from
    :func:`~dora_analysis.correlations` over the seeds' runs pooled (each centred on its own);
    ``r_seed_min``, ``r_seed_mean`` and ``r_seed_max`` are each seed's own r, so the spread across
    seeds stands beside the interval. ``r_increments`` (and its interval) is r of the step-to-step
    increments of ΔM and ΔD within the window (:func:`~dora_analysis.analysis.coupling.increments`);
    ``r_relative`` r with ΔM divided by the tensor's mean base magnitude
    (:func:`~dora_analysis.analysis.coupling.relative_to_base`);
    ``r_rows_abs``/``r_rows_signed`` (with intervals) the row-by-row r within each matrix at the
    window's last step, pooled over seeds and layers (paper convention only, from ``coupling``).
    ``accuracy`` is the mean held-out accuracy at the window's last step.
    """
    cells = {c.name: c for c in plan.cells}
    rows = []
    for (cell, convention), group in points.groupby(["cell", "convention"], sort=False):
        windows = ["paper"] + (list(plan.base_only_windows) if cell == "base" else [])
        for window in windows:
            own = cells[cell].window if cell in cells else None
            steps = own if window == "paper" and own else plan.windows[window]
            part = group[group["step"].isin(steps)]
            if part.empty:
                continue
            first = group.iloc[0]
            where = {
                "cell": cell,
                "factor": first["factor"],
                "value": first["value"],
                "window": window,
                "steps": " ".join(str(s) for s in steps),
            }
            rows_coupling = None
            if coupling is not None and convention == "paper":
                rows_coupling = coupling[(coupling["cell"] == cell) & (coupling["step"] == max(steps))]
            rows += _window_rows(part, steps, where, convention, rows_coupling)
    return pd.DataFrame(rows)


#: The correlation table's columns a study row carries over (the statistics and their intervals).
_CARRIED = tuple(
    c
    for c in CORRELATION_COLUMNS
    if c not in ("method", "run", "stack", "module", "n", "runs", "steps", "layers", "bootstrap", "intercept")
)


def _window_rows(
    part: pd.DataFrame, steps: tuple[int, ...], where: dict, convention: str, coupling: pd.DataFrame | None
) -> list[dict]:
    """The study rows of one (cell, convention, window): one per (method, module) of ``part``."""
    from dora_analysis.analysis.correlation import correlations
    from dora_analysis.analysis.coupling import increments, relative_to_base

    # The seeds' runs pooled: centred per run, the interval from leaving out a layer of every seed.
    pooled = correlations(part, pool_runs=True)
    per_seed = pd.concat(
        [correlations(p, pool_runs=True).assign(seed=s) for s, p in part.groupby("seed")],
        ignore_index=True,
    )
    stepped = increments(part)
    moved = correlations(stepped, pool_runs=True) if not stepped.empty else None
    relative = correlations(relative_to_base(part), pool_runs=True)
    last = part[part["step"] == max(steps)]
    rows = []
    for stats in pooled.to_dict("records"):
        method, module = stats["method"], stats["module"]
        seeds = per_seed[(per_seed["method"] == method) & (per_seed["module"] == module)]["r"]
        accuracy = last[last["method"] == method].groupby("seed")["eval_metric"].first()
        row = {**where, "method": method, "module": module, "convention": convention, "n": stats["n"]}
        row.update(
            seeds=int(seeds.size), r_seed_min=seeds.min(), r_seed_mean=seeds.mean(), r_seed_max=seeds.max()
        )
        row.update({c: stats.get(c) for c in _CARRIED})
        row.update(_r_columns(moved, method, module, "r_increments"))
        row.update(_r_columns(relative, method, module, "r_relative"))
        row.update(_row_columns(coupling, method, module))
        row["accuracy"] = accuracy.mean() if accuracy.size else float("nan")
        rows.append(row)
    return rows


def _r_columns(found: pd.DataFrame | None, method: str, module: str, name: str) -> dict:
    """``name`` and its interval: the r of ``found`` (a correlation table) for one method and module
    (NaN where there is none, as for increments in a window of one step)."""
    nan = float("nan")
    rows = None if found is None else found[(found["method"] == method) & (found["module"] == module)]
    if rows is None or rows.empty:
        return {name: nan, f"{name}_low": nan, f"{name}_high": nan}
    first = rows.iloc[0]
    return {name: first["r"], f"{name}_low": first["r_low"], f"{name}_high": first["r_high"]}


def _row_columns(coupling: pd.DataFrame | None, method: str, module: str) -> dict:
    """The row-by-row r (|Δm| and signed Δm with 1 - cos) pooled over seeds and layers, with intervals."""
    from dora_analysis.analysis.coupling import row_coupling_summary

    out = {f"r_rows_{kind}{end}": float("nan") for kind in ("abs", "signed") for end in ("", "_low", "_high")}
    if coupling is None:
        return out
    part = coupling[(coupling["method"] == method) & (coupling["module"] == module)]
    if part.empty:
        return out
    summary = row_coupling_summary(part.assign(run=part["run"].astype(str))).iloc[0]
    for kind in ("abs", "signed"):
        for suffix in ("", "_low", "_high"):
            out[f"r_rows_{kind}{suffix}"] = summary[f"r_{kind}{suffix}"]
    return out


def _write_results(
    config: StudyConfig,
    plan: StudyPlan,
    points: pd.DataFrame,
    table: pd.DataFrame,
    timing: str,
    coupling: pd.DataFrame,
) -> None:
    from dora_analysis.views.study import render_study_report, write_row_coupling_figures, write_sign_maps
    from dora_analysis.views.tables import atomic_write

    out, overwrite = config.out, config.overwrite
    (out / "figures").mkdir(exist_ok=True)
    atomic_write(out / "points.csv", points.to_csv(index=False), overwrite=overwrite)
    atomic_write(out / "study.csv", table.to_csv(index=False), overwrite=overwrite)
    atomic_write(out / "row_coupling.csv", coupling.to_csv(index=False), overwrite=overwrite)
    steps = study_row_steps(coupling)
    atomic_write(out / "row_coupling_steps.csv", steps.to_csv(index=False), overwrite=overwrite)
    figures = write_sign_maps(table, out / "figures", overwrite=overwrite)
    figures |= write_row_coupling_figures(steps, out / "figures", overwrite=overwrite)
    context = [
        f"Grid: {len(plan.cells)} configurations x FT/LoRA/DoRA x {len(plan.seeds)} seeds "
        f"({len(points.groupby(['cell', 'method', 'seed']))} runs), {plan.steps} steps each, a checkpoint "
        f"every {plan.save_every}" + (" (quick)" if config.quick else ""),
        "Windows: " + "; ".join(f"{k} = steps {', '.join(map(str, v))}" for k, v in plan.windows.items()),
        *(
            f"{c.name}: {c.steps} steps, a checkpoint every {c.save_every}; its window: steps "
            + ", ".join(map(str, c.window or ()))
            for c in plan.cells
            if c.steps
        ),
        timing,
    ]
    text = render_study_report(table, figures, relative_to=out, context=context)
    atomic_write(out / "report.md", text, overwrite=overwrite)


def study_summary(table: pd.DataFrame, out: Path) -> list[str]:
    """The lines the CLI prints: r of the query in the base configuration per method, the report."""
    base = table[(table["cell"] == "base") & (table["window"] == "paper") & (table["convention"] == "paper")]
    lines = [
        f"{row.method:>5}: query r = {row.r:+.2f} [{row.r_low:+.2f}, {row.r_high:+.2f}] (base configuration)"
        for row in base[base["module"] == "query"].itertuples(index=False)
    ]
    return lines + [f"report: {out / 'report.md'}"]
