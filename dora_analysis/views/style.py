"""The look every figure shares: the pyplot backend, the seaborn style, colours, line styles, saving.

Used by :mod:`~dora_analysis.views.figures`, :mod:`~dora_analysis.views.spectrum_figures` and
:mod:`~dora_analysis.views.study`, so the paper's figures and the extra ones look alike. Figures are
built inside :func:`figure_style` and saved by :func:`save_figure` as PNG (200 dpi) and PDF,
atomically. matplotlib is imported inside the functions, with the ``Agg`` backend (no display needed).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import pandas as pd

from dora_analysis.atomic import atomic_path, refuse_existing
from dora_analysis.errors import InputError

__all__ = [
    "DPI",
    "dodge",
    "figure_style",
    "final_step",
    "layer_colours",
    "line_style",
    "method_colours",
    "pyplot",
    "refuse_existing_figures",
    "save_figure",
]

DPI = 200

# Line style and marker per method, so that overlapping lines (LoRA and DoRA often share ΔD) stay visible.
_METHOD_LINES = {"ft": (":", "^"), "lora": ("--", "s"), "dora": ("-", "o")}


def pyplot():
    """``matplotlib.pyplot`` on the ``Agg`` backend (files only), unless a backend was already chosen
    (a notebook's inline backend is left alone)."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def figure_style() -> Iterator[None]:
    """seaborn's ``whitegrid`` look at ``paper`` scale, enlarged to stay legible when printed small."""
    pyplot()
    import seaborn as sns

    with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.35):
        yield


def layer_colours(layers: Sequence) -> dict:
    """``{layer: colour}``: colour-blind safe up to ten layers, evenly spaced hues beyond."""
    import seaborn as sns

    palette = sns.color_palette("colorblind" if len(layers) <= 10 else "husl", len(layers))
    return dict(zip(layers, palette, strict=True))


def line_style(method: str) -> tuple[str, str]:
    """``(linestyle, marker)`` of ``method``'s lines."""
    return _METHOD_LINES.get(str(method).lower(), ("-.", "D"))


def dodge(index: int, count: int, spread: float = 0.3) -> float:
    """The x offset of line ``index`` of ``count`` drawn over the same integer x (layers): the lines
    share ``spread`` of the gap between ticks, centred on it, so lines with equal values (two methods, or
    seeds, with the same ΔD) sit side by side instead of one hiding the other."""
    if count <= 1:
        return 0.0
    return spread * (index / (count - 1) - 0.5)


def method_colours(methods: Sequence[str]) -> dict:
    """``{method: colour}``: FT grey, LoRA blue, DoRA red, other methods the palette's other colours."""
    import seaborn as sns

    palette = sns.color_palette("deep", 10)
    fixed = {"ft": palette[7], "lora": palette[0], "dora": palette[3]}  # grey, blue, red
    others = iter(palette[1:3] + palette[4:7] + palette[8:])
    return {m: fixed.get(m) or next(others) for m in methods}


def final_step(df: pd.DataFrame) -> pd.DataFrame:
    """Each run's rows at its last step (``run`` column if present, else per method)."""
    key = "run" if "run" in df.columns else "method"
    last = df.groupby(key)["step"].transform("max")
    return df[df["step"] == last]


def save_figure(
    fig,
    stem: str | os.PathLike,
    formats: Sequence[str] = ("png", "pdf"),
    overwrite: bool = False,
    dpi: int = DPI,
) -> list[Path]:
    """Save ``fig`` as ``<stem>.png`` (``dpi``) and ``<stem>.pdf``, each through a temporary file.

    Raises:
        InputError: a target exists and ``overwrite`` is False (checked before anything is written).
    """
    plt = pyplot()
    stem = Path(stem)
    targets = [stem.with_name(f"{stem.name}.{fmt}") for fmt in formats]
    for target in targets:
        refuse_existing(target, overwrite)  # all checked before anything is written
    for target, fmt in zip(targets, formats, strict=True):
        with atomic_path(target) as temporary:
            # A fixed date keeps the PDF bytes stable from run to run.
            metadata = {"CreationDate": None} if fmt == "pdf" else {"Software": None}
            fig.savefig(temporary, format=fmt, dpi=dpi, bbox_inches="tight", metadata=metadata)
    plt.close(fig)
    return targets


def refuse_existing_figures(out: Path, names: Iterable[str], formats: Iterable[str]) -> None:
    """Raise before anything is drawn when ``out/<name>.<format>`` exists for any of them (the figures
    of one call are refused together, not one by one as each is saved).

    Raises:
        InputError: the first such file, saying to pass ``--overwrite``.
    """
    formats = tuple(formats)
    for name in names:
        for fmt in formats:
            if (Path(out) / f"{name}.{fmt}").exists():
                raise InputError.of(
                    Path(out) / f"{name}.{fmt}", "already exists; pass --overwrite to replace it"
                )
