"""Compare a pre-trained checkpoint with fine-tuned ones: one tidy row per tensor (the front door).

:func:`compare_many` decides where the work runs: in this process, tensor-major
(:func:`~dora_analysis.analysis.tensor_major.compare_in_process`), or on Ray
(:func:`~dora_analysis.analysis.cluster.compare_on_cluster`), which runs the same in-process code on
groups of tensors. Both plan alike (:mod:`~dora_analysis.analysis.planning`), so the frames are the
same. The analysis depends one way: planning -> tensor_major -> cluster -> comparison -> series.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import torch

from dora_analysis.analysis.cluster import Cluster, compare_on_cluster
from dora_analysis.analysis.spectrum import SpectrumOptions
from dora_analysis.analysis.tensor_major import PathOrReader, compare_in_process
from dora_analysis.errors import InputError
from dora_analysis.readers.base import CheckpointReader
from dora_analysis.readers.runs import named_base
from dora_analysis.schema import parse_metrics

__all__ = ["compare", "compare_many", "adapters_base"]


def compare_many(
    base: PathOrReader | None,
    tuned: Sequence[PathOrReader],
    include: str | None = None,
    exclude: str | None = None,
    progress: bool | Callable[[int], None] = False,
    device: str | torch.device | None = None,
    cluster: Cluster | str | bool | None = None,
    *,
    layout: str | None = None,
    per_row: bool = False,
    metrics: str | Sequence[str] | None = None,
    spectrum: SpectrumOptions | None = None,
    references: Sequence[int | None] | None = None,
) -> list[pd.DataFrame]:
    """Compare ``base`` against every checkpoint in ``tuned``, reading each base tensor once.

    Args:
        base: the pre-trained checkpoint (path, Hugging Face model id in the local cache, or open
            reader); None: the base an adapter's ``adapter_config.json`` names (every adapter in
            ``tuned`` must name the same one).
        tuned: fine-tuned checkpoints or adapter folders over ``base`` (paths or open readers).
        include, exclude: regular expressions on tensor names (see :func:`select_tensors`).
        progress: show a progress bar on stderr (only where stderr is a terminal); with ``cluster``
            also a callable, given the number of base tensors each finished task analysed.
        device: where the tensors are analysed (e.g. ``"cuda"``); default: where the reader puts them.
        cluster: run on Ray (``True``: a local Ray for the call; ``"auto"``/``"HOST:PORT"``: join a
            cluster; see :mod:`dora_analysis.analysis.cluster`); the frames are the same, bit for bit.
        layout: ``"auto"``/None (the model's ``config.json`` decides each tensor's layout, see
            :mod:`dora_analysis.readers.layout`), or ``"linear"``, ``"conv1d-transposed"``,
            ``"embedding"`` for every 2-D weight.
        per_row: one row per output unit instead of one per tensor (columns :data:`PER_ROW_COLUMNS`).
        metrics: metric groups, ``"decomposition,spectrum,intruders"`` or a list (see
            :func:`parse_metrics`; default ``decomposition``): ``spectrum`` adds the update's
            singular-spectrum columns, ``intruders`` ``intruder_dimensions``
            (:mod:`dora_analysis.analysis.spectrum`).
        spectrum: options of those columns (k, ε, φ's i = j, a randomised SVD).
        references: per tuned checkpoint, the index (into ``tuned``) of another one whose update
            its own is compared with by the LoRA paper's subspace similarity φ
            (column ``subspace_to_reference``), or None.
    Returns:
        One DataFrame per tuned checkpoint, columns :data:`COLUMNS`, one row per analysed tensor,
        ordered by stack, layer (a nullable integer) and module (:func:`sort_rows`); ``df.attrs``
        holds ``base_only`` and ``tuned_only`` (names found on one side only), ``layout_rule`` (what
        decided the layouts) and ``layout_ambiguous`` (tensors whose layout was guessed from the name).
    """
    if base is None:
        base = adapters_base(tuned)
    groups = parse_metrics(metrics)
    if references is not None and len(references) != len(tuned):
        raise ValueError(f"references has {len(references)} entries for {len(tuned)} checkpoints")
    options = {"layout": layout, "metrics": groups, "spectrum": spectrum, "references": references}
    if cluster is None or cluster is False:
        return compare_in_process(
            base, tuned, include, exclude, bool(progress), device, per_row=per_row, **options
        )
    if per_row:
        raise InputError.of("--per-row", "is not available with --cluster: run it in one process")
    return compare_on_cluster(base, tuned, include, exclude, progress, device, cluster, **options)


def compare(
    base: PathOrReader | None,
    tuned: PathOrReader,
    include: str | None = None,
    exclude: str | None = None,
    progress: bool = False,
    device: str | torch.device | None = None,
    cluster: Cluster | str | bool | None = None,
    *,
    layout: str | None = None,
    per_row: bool = False,
    metrics: str | Sequence[str] | None = None,
    spectrum: SpectrumOptions | None = None,
    reference: PathOrReader | None = None,
) -> pd.DataFrame:
    """ΔM and ΔD of every analysed tensor of ``tuned`` against ``base``; see :func:`compare_many`.

    ``reference``: a second fine-tuned checkpoint of the same ``base``: the column
    ``subspace_to_reference`` holds φ(ΔW_tuned, ΔW_reference) per tensor (both updates taken from
    ``base``); the other columns are ``tuned``'s against ``base``, as without it.

    ``base`` None: an adapter's own ``base_model_name_or_path`` (a path or a cached model id).

    Example:
        >>> df = compare("base/model.safetensors", "run/checkpoint-200")  # doctest: +SKIP
        >>> df[["tensor", "delta_magnitude", "delta_direction"]]            # doctest: +SKIP
    """
    others = [tuned] if reference is None else [tuned, reference]
    return compare_many(
        base,
        others,
        include=include,
        exclude=exclude,
        progress=progress,
        device=device,
        cluster=cluster,
        layout=layout,
        per_row=per_row,
        metrics=metrics,
        spectrum=spectrum,
        references=None if reference is None else [1, None],
    )[0]


def adapters_base(tuned: Sequence[PathOrReader]) -> str:
    """The one base every adapter in ``tuned`` names (``adapter_config.json``'s
    ``base_model_name_or_path``, see :func:`~dora_analysis.readers.runs.named_base`).

    Raises:
        InputError: a tuned checkpoint that is not an adapter, or adapters naming different bases.
    """
    bases = set()
    for source in tuned:
        if isinstance(source, CheckpointReader):
            raise InputError.of(source.source, "no base given: pass the pre-trained checkpoint")
        found = named_base(Path(source), adapters_only=True)
        if found is None:
            raise InputError.of(
                source,
                "no base given and this is not an adapter naming its base_model_name_or_path: "
                "pass the pre-trained checkpoint",
            )
        bases.add(found)
    if len(bases) != 1:
        raise InputError.of(tuned[0], f"the adapters name different bases: {sorted(bases)}; pass one")
    return bases.pop()
