"""The contract between the analysis and its views: the methods, the logged metrics, the points.

Training writes these names, the analysis groups by them and the views label and filter by them;
each exists here once, so a new method or metric is added in one place. Pure pandas, no files.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

__all__ = [
    "METHODS",
    "METHOD_LABELS",
    "method_label",
    "method_order",
    "NOT_METRICS",
    "default_metric",
    "points",
    "module_is",
    "module_mask",
    "select_modules",
]

#: The methods, in the order the paper's figures show them.
METHODS: tuple[str, ...] = ("ft", "lora", "dora")
METHOD_LABELS = {"ft": "FT", "lora": "LoRA", "dora": "DoRA"}

#: Trainer ``log_history`` keys that are bookkeeping, never a quality metric to plot or report.
NOT_METRICS = ("eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "epoch")


def method_label(method: str) -> str:
    """``"dora"`` -> ``"DoRA"``; an unknown method is shown as given."""
    return METHOD_LABELS.get(str(method).lower(), str(method))


def method_order(present: Iterable[str]) -> list[str]:
    """The methods in ``present`` in paper order, then any others sorted."""
    present = set(present)
    return [m for m in METHODS if m in present] + sorted(m for m in present if m not in METHODS)


def default_metric(columns: Iterable[str]) -> str | None:
    """The quality metric to show from a run's logged ``eval_*`` keys: accuracy if logged, else the first."""
    metrics = [c for c in columns if str(c).startswith("eval_") and c not in NOT_METRICS]
    if "eval_accuracy" in metrics:
        return "eval_accuracy"
    return metrics[0] if metrics else None


def points(df: pd.DataFrame) -> pd.DataFrame:
    """The rows that are points of the analysis: finite ΔM and ΔD, not both exactly zero.

    Exact zeros are tensors the run never changed (a module LoRA does not adapt, or step 0), which
    would otherwise pile up at the origin and drive the correlation.
    """
    finite = np.isfinite(df["delta_direction"]) & np.isfinite(df["delta_magnitude"])
    moved = (df["delta_direction"] != 0) | (df["delta_magnitude"] != 0)
    return df[finite & moved]


def module_is(module: str, wanted: str) -> bool:
    """``module`` (a path inside a block, ``attention.self.query``) is ``wanted``, given whole or by its
    last parts (``query``, ``self.query``): the paper's names select our full module paths."""
    return module == wanted or str(module).endswith("." + wanted)


def module_mask(modules: pd.Series, wanted: str) -> pd.Series:
    """The entries of ``modules`` that are ``wanted`` (a boolean Series): the exact module where
    present, else the one module whose path ends with it.

    Raises:
        InputError: ``wanted`` ends several different modules (``q_proj``: ``self_attn.q_proj`` and
            ``encoder_attn.q_proj``), which must never be pooled.
    """
    exact = modules == wanted
    if exact.any():
        return exact
    mask = modules.map(lambda m: module_is(m, wanted)).astype(bool)
    found = sorted(set(modules[mask]))
    if len(found) > 1:
        from dora_analysis.errors import InputError

        raise InputError.of(
            "--modules", f"{wanted!r} names several modules ({', '.join(found)}): give the full name"
        )
    return mask


def select_modules(df: pd.DataFrame, modules: Iterable[str]) -> pd.DataFrame:
    """The rows of ``df`` that are each of ``modules`` (see :func:`module_mask`), their ``module``
    relabelled as asked (``query`` for ``attention.self.query``), in the order of ``modules``."""
    parts = [df[module_mask(df["module"], m)].assign(module=m) for m in modules]
    return pd.concat(parts) if parts else df.iloc[:0]
