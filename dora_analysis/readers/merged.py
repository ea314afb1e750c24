"""A reader that yields base weights with low-rank updates merged in (shared by the adapter formats).

Each exposed name is either a merged target (a base weight plus stored factors), a merged bias
(PEFT ``lora_bias``), or a copy of a tensor stored whole (``modules_to_save``, biases, the rest of a
full state dict). Factors are read per request, one module at a time.

A conv LoRA (PEFT: ``lora_A`` a conv ``(r, in, *k)``, ``lora_B`` a 1x1 conv ``(out, r, 1, ...)``, DoRA
magnitude ``(1, out, 1, ...)``) is a linear LoRA on the conv weight's rows ``(out, in * prod(k))``:
its factors are served flattened to ``(r, in * prod(k))`` and ``(out, r)``, and merged on those rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from dora_analysis.errors import InputError
from dora_analysis.factors import low_rank_fit_problem, merge_low_rank
from dora_analysis.readers._common import ReaderMixin
from dora_analysis.readers.base import CheckpointReader, EntryReader, LowRankUpdate

__all__ = ["MergeTarget", "BiasTarget", "StoredCopy", "MergedReader"]


@dataclass(frozen=True)
class MergeTarget:
    """One weight rebuilt from ``W0`` and factors.

    ``lora_A``/``lora_B`` are keys in ``factors`` (None for a magnitude-only module, NVlabs'
    ``Wdecompose``); ``magnitude`` is the DoRA magnitude key (``(out,)`` or ``(out, 1)``) or None.
    """

    weight_source: CheckpointReader
    weight_key: str
    factors: CheckpointReader
    lora_A: str | None
    lora_B: str | None
    magnitude: str | None
    scale: float
    fan_in_fan_out: bool = False


@dataclass(frozen=True)
class BiasTarget:
    """A base bias plus ``scale * lora_B.bias`` (PEFT ``lora_bias=True``)."""

    weight_source: CheckpointReader
    weight_key: str
    factors: CheckpointReader
    lora_bias: str
    scale: float


@dataclass(frozen=True)
class StoredCopy:
    """A tensor stored whole."""

    source: CheckpointReader
    key: str


Entry = MergeTarget | BiasTarget | StoredCopy


class MergedReader(EntryReader, ReaderMixin):
    """Names map to :data:`Entry` records; ``close`` closes the readers it was given to own."""

    def __init__(
        self, source: Path, entries: dict[str, Entry], *, partial: bool, owned: list[CheckpointReader]
    ) -> None:
        self.source = Path(source)
        self.partial = partial
        self._entries = entries
        self._owned = owned
        for entry in entries.values():
            _check_fits(entry)

    def shape(self, name: str) -> tuple[int, ...]:
        e = self._entry(name)
        return e.source.shape(e.key) if isinstance(e, StoredCopy) else e.weight_source.shape(e.weight_key)

    def dtype(self, name: str) -> torch.dtype:
        e = self._entry(name)
        return e.source.dtype(e.key) if isinstance(e, StoredCopy) else torch.float32

    def get(self, name: str) -> torch.Tensor:
        e = self._entry(name)
        if isinstance(e, StoredCopy):
            return e.source.get(e.key)
        if isinstance(e, BiasTarget):
            bias = e.weight_source.get(e.weight_key).to(torch.float32)
            return bias + e.scale * e.factors.get(e.lora_bias).to(torch.float32)
        update = self.low_rank(name)
        assert update is not None
        base = e.weight_source.get(e.weight_key)
        # a conv is merged on its rows and returned in its own shape (both no-ops for a 2-D weight)
        return merge_low_rank(base.reshape(_rows_shape(base.shape)), update).reshape(base.shape)

    def low_rank(self, name: str) -> LowRankUpdate | None:
        e = self._entry(name)
        if not isinstance(e, MergeTarget):
            return None
        if e.lora_A is None or e.lora_B is None:  # magnitude only: a rank-0 update
            shape = e.weight_source.shape(e.weight_key)
            out_dim, in_dim = (shape[1], shape[0]) if e.fan_in_fan_out else (shape[0], shape[1])
            a, b = torch.zeros(0, in_dim), torch.zeros(out_dim, 0)
        else:
            # conv factors as rows (checked to fit at opening); 2-D factors stay as they are
            a, b = e.factors.get(e.lora_A).flatten(1), e.factors.get(e.lora_B).flatten(1)
        magnitude = None if e.magnitude is None else e.factors.get(e.magnitude).reshape(-1)
        return LowRankUpdate(name, a, b, e.scale, magnitude, e.fan_in_fan_out)

    def close(self) -> None:
        for reader in self._owned:
            reader.close()
        self._owned = []


def _check_fits(e: Entry) -> None:
    """Raise :class:`InputError` naming the factor file and tensor when factors cannot update the base."""
    if isinstance(e, StoredCopy):
        return
    base_shape = e.weight_source.shape(e.weight_key)
    if isinstance(e, BiasTarget):
        lb_shape = e.factors.shape(e.lora_bias)
        if tuple(lb_shape) != tuple(base_shape):
            raise InputError.of(
                e.factors.source,
                f"lora_B bias has shape {tuple(lb_shape)}, but base {e.weight_key} is {tuple(base_shape)}",
                tensor=e.lora_bias,
            )
        return
    mag_shape = None if e.magnitude is None else e.factors.shape(e.magnitude)
    if mag_shape is not None and sum(d != 1 for d in mag_shape) <= 1:
        mag_shape = (math.prod(mag_shape),)  # NVlabs stores (out, 1), PEFT's conv DoRA (1, out, 1, 1)
    if e.lora_A is None or e.lora_B is None:
        if len(base_shape) != 2:
            problem = f"the base weight {e.weight_key} is {tuple(base_shape)}, expected 2-D"
        else:
            out_dim = base_shape[1] if e.fan_in_fan_out else base_shape[0]
            ok = mag_shape is not None and tuple(mag_shape) == (out_dim,)
            problem = (
                None if ok else f"the DoRA magnitude has shape {mag_shape}, expected (out,) = ({out_dim},)"
            )
        key = e.magnitude
    else:
        a_shape, b_shape = e.factors.shape(e.lora_A), e.factors.shape(e.lora_B)
        if len(base_shape) > 2:
            problem = _conv_factor_problem(base_shape, a_shape, b_shape)
        else:  # PEFT's Linear/Embedding/Conv1D factors are matrices; flattening must not make them fit
            problem = (
                low_rank_fit_problem(base_shape, a_shape, b_shape)
                if len(a_shape) != 2 or len(b_shape) != 2
                else None
            )
        rows = [
            _rows_shape(shape) for shape in (base_shape, a_shape, b_shape)
        ]  # a conv's factors fit its rows
        problem = problem or low_rank_fit_problem(*rows, mag_shape, e.fan_in_fan_out)
        key = e.lora_A
    if problem:
        raise InputError.of(
            e.factors.source, f"factors do not fit base weight {e.weight_key}: {problem}", tensor=key
        )


def _rows_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A conv weight or factor ``(d0, d1, *k)`` as the matrix its rows form, ``(d0, d1 * prod(k))``."""
    return (shape[0], math.prod(shape[1:])) if len(shape) > 2 else tuple(shape)


def _conv_factor_problem(
    base_shape: tuple[int, ...], a_shape: tuple[int, ...], b_shape: tuple[int, ...]
) -> str | None:
    """Why conv factors cannot update a conv weight, beyond what their flattened shapes tell."""
    if len(a_shape) != len(base_shape) or tuple(a_shape[2:]) != tuple(base_shape[2:]):
        return f"conv lora_A {tuple(a_shape)} should have the base weight's kernel {tuple(base_shape[2:])}"
    if len(b_shape) != len(base_shape) or any(d != 1 for d in b_shape[2:]):
        return f"conv lora_B {tuple(b_shape)} should be a 1x1 conv (out, r, {', '.join('1' * (len(base_shape) - 2))})"
    return None
