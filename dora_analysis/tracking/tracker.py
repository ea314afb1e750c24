"""ΔM and ΔD of a model while it trains: :class:`DecompositionTracker`, for any PyTorch loop.

Each :meth:`~DecompositionTracker.record` compares the live model with its pre-trained weights
through the same comparison as :func:`dora_analysis.compare` (the same selection, layouts, names and
row math), so its rows are the rows :func:`dora_analysis.analyze_series` gives for a checkpoint saved
at that step: columns :data:`~dora_analysis.schema.SERIES_COLUMNS`, ``checkpoint`` empty
and the evaluation columns NaN (nothing was evaluated).

LoRA/DoRA models are analysed from their live factors over the frozen base weight in the model (no
merged weight is formed); a fully fine-tuned model against its base checkpoint on disk (the model's
``name_or_path``, or ``base=``), read one tensor at a time: never a second copy of the model.
Reductions run in float64 on the model's device, with autocast off.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from dora_analysis.analysis.comparison import compare_many
from dora_analysis.errors import InputError
from dora_analysis.readers import open_checkpoint, resolve_model
from dora_analysis.readers.base import CheckpointReader
from dora_analysis.readers.names import match_names
from dora_analysis.schema import SERIES_COLUMNS, sort_rows
from dora_analysis.tracking.live import LiveReader, live_model

__all__ = ["DecompositionTracker", "module_means"]


class DecompositionTracker:
    """Record ΔM and ΔD of ``model``'s weights against the pre-trained ones, step by step.

    Args:
        model: the model being trained: a transformers model, a PEFT model, one with this package's
            adapter layers, or any ``nn.Module`` (DDP and FSDP2 wrapped ones too: every rank must
            call :meth:`record` under FSDP2, whose shards are gathered one tensor at a time).
        base: the pre-trained checkpoint (path or cached model id). Default: for LoRA/DoRA the frozen
            weights inside the model (those the model's ``name_or_path`` checkpoint holds, where it
            names one); for full fine-tuning the model's ``name_or_path``.
        run: the ``run`` column (default ``"run"``); method: the ``method`` column (default: from the
            model's layers: ``ft``, ``lora`` or ``dora``).
        include, exclude, layout: as :func:`dora_analysis.compare`.
        device: where the comparison runs (default: the model's device).

    Example:
        >>> tracker = DecompositionTracker(model)              # doctest: +SKIP
        >>> for step in range(steps): ...; tracker.record(step)  # doctest: +SKIP
        >>> tracker.frame().groupby("step")["delta_direction"].mean()  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        base: str | os.PathLike | None = None,
        *,
        run: str = "run",
        method: str | None = None,
        include: str | None = None,
        exclude: str | None = None,
        layout: str | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.model = model
        self.run = run
        self.include, self.exclude, self.layout = include, exclude, layout
        found = live_model(model)
        self.method = method or found.method
        self._config_dir = Path(tempfile.mkdtemp(prefix="dora-tracking-"))
        _write_config(model, self._config_dir)
        self._tuned = LiveReader(self._config_dir, found.tuned, partial=found.method != "ft")
        self._base: CheckpointReader
        self._owned: CheckpointReader | None = None
        if base is None and found.method != "ft":
            frozen = _in_base_checkpoint(model, found.base)
            self._base = LiveReader(self._config_dir, frozen, partial=False)
        else:
            self._base = self._owned = open_checkpoint(_base_path(model, base))
        self.device = torch.device(device) if device is not None else _model_device(model)
        self._frames: list[pd.DataFrame] = []

    def record(self, step: int) -> pd.DataFrame:
        """Compare the model as it is now; returns this step's rows (also kept for :meth:`frame`).

        Returns:
            One row per analysed tensor, columns :data:`SERIES_COLUMNS`.
        """
        with _analysis_mode(self.device):
            compared = compare_many(
                self._base,
                [self._tuned],
                self.include,
                self.exclude,
                device=None if self.device.type == "cpu" else self.device,
                layout=self.layout,
            )[0]
        rows = compared.assign(
            run=self.run,
            method=self.method,
            step=int(step),
            eval_metric=float("nan"),
            eval_metric_name=None,
            eval_loss=float("nan"),
            checkpoint=None,
        )
        rows["step"] = rows["step"].astype("Int64")
        rows = rows[SERIES_COLUMNS]
        self._frames.append(rows)
        return rows

    def frame(self) -> pd.DataFrame:
        """Every recorded row, ordered by run, step, stack, layer and module (as ``analyze_series``)."""
        if not self._frames:
            empty = pd.DataFrame(columns=SERIES_COLUMNS)
            return empty.astype({"step": "Int64", "layer": "Int64"})
        whole = pd.concat(self._frames, ignore_index=True)
        return sort_rows(whole, first=["run", "step"])[SERIES_COLUMNS]

    def keep(self, frame: pd.DataFrame) -> None:
        """Start from ``frame``'s rows (a resumed run's earlier records) instead of what was recorded."""
        self._frames = [frame[SERIES_COLUMNS].copy()] if len(frame) else []

    def close(self) -> None:
        """Close the base checkpoint (when read from disk) and remove the temporary config folder."""
        if self._owned is not None:
            self._owned.close()
            self._owned = None
        shutil.rmtree(self._config_dir, ignore_errors=True)

    def __enter__(self) -> DecompositionTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            shutil.rmtree(self._config_dir, ignore_errors=True)


def module_means(rows: pd.DataFrame, prefix: str = "dora") -> dict[str, float]:
    """``{"dora/<module>/delta_magnitude": mean, ...}`` over the rows' tensors (NaN rows skipped)."""
    means = rows.groupby("module", sort=True)[["delta_magnitude", "delta_direction"]].mean()
    return {
        f"{prefix}/{module}/{column}": float(value)
        for module, values in means.iterrows()
        for column, value in values.items()
    }


@contextlib.contextmanager
def _analysis_mode(device: torch.device) -> Iterator[None]:
    """No gradients and no autocast (a record inside an autocast region must not compute in bf16)."""
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for kind in {"cpu", device.type}:
            with contextlib.suppress(RuntimeError, ValueError):
                stack.enter_context(torch.autocast(kind, enabled=False))
        yield


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DDP / torch.compile wrappers."""
    for attribute in ("module", "_orig_mod"):
        inner = getattr(model, attribute, None)
        if isinstance(inner, nn.Module):
            return _unwrapped(inner)
    return model


def _write_config(model: nn.Module, folder: Path) -> None:
    """The model's ``config.json`` into ``folder``, where the comparison looks for layouts (none for a
    model without a transformers config: the name rule applies, as for a checkpoint without one)."""
    inner = _unwrapped(model)
    get_base = getattr(inner, "get_base_model", None)
    inner = get_base() if callable(get_base) else inner  # a PEFT model: the transformers model inside
    config = getattr(inner, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if not callable(to_dict):
        return
    record = to_dict()
    if not record.get("architectures"):
        record["architectures"] = [type(inner).__name__]
    (folder / "config.json").write_text(json.dumps(record, default=str), encoding="utf-8")


def _base_path(model: nn.Module, base: str | os.PathLike | None) -> Path:
    """``base``, else the model's ``name_or_path``, as a local folder."""
    if base is None:
        inner = _unwrapped(model)
        base = getattr(inner, "name_or_path", None) or getattr(
            getattr(inner, "config", None), "_name_or_path", None
        )
        if not base:
            raise InputError.of(
                type(inner).__name__,
                "a fully fine-tuned model without name_or_path: pass base= (the pre-trained checkpoint)",
            )
    return resolve_model(base)


def _in_base_checkpoint(model: nn.Module, frozen: dict) -> dict:
    """The frozen tensors the model's base checkpoint also holds, by their stored names (a PEFT classifier over an encoder
    saved without a head compares its head with nothing, as ``compare`` on the files would); all of
    them where the model names no readable checkpoint. Only the names are read."""
    try:
        with open_checkpoint(_base_path(model, None)) as reader:
            stored = reader.names()
    except InputError:
        return frozen
    # keyed by the stored names, so that the ``tensor`` column is the checkpoint's, as in ``compare``
    return {stored_name: frozen[name] for stored_name, name in match_names(stored, list(frozen)).pairs}


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
