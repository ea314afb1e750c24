"""What a tensor's name says: wrapper prefixes, layer index, module, and which axis holds the rows.

Pure string logic (plus a reshape in :func:`as_rows`); no file access, no statistics.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import torch

__all__ = [
    "WRAPPER_PREFIXES",
    "strip_prefixes",
    "canonical_name",
    "layer_index",
    "module_name",
    "RowLayout",
    "row_layout",
    "as_rows",
    "NameMatch",
    "match_names",
    "is_default_analysed",
]

# Prefixes that wrappers add in front of the same weights: DDP, torch.compile, PEFT, and the
# ``model.`` of ``*ForCausalLM`` classes.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.", "model.")

RowLayout = Literal["linear", "conv", "embedding", "transposed"]

_EMBEDDING = re.compile(r"(^|\.)(embed\w*|\w*embeddings?|wte|wpe|shared)(\.|$)")
# transformers' Conv1D (GPT-2 family) stores (in, out).
_TRANSPOSED = re.compile(r"(^|\.)(c_attn|c_proj|c_fc)\.weight$")
_LAYER = re.compile(r"(?:^|\.)(\d+)\.")
_GENERIC_MODULES = {"dense", "linear", "proj", "fc"}


def strip_prefixes(name: str, prefixes: tuple[str, ...]) -> str:
    """``name`` without any of ``prefixes`` at its start, however many and in whatever order."""
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def canonical_name(name: str) -> str:
    """``name`` without any leading wrapper prefixes (see :data:`WRAPPER_PREFIXES`)."""
    return strip_prefixes(name, WRAPPER_PREFIXES)


def layer_index(name: str) -> int | None:
    """The first integer path component (``encoder.layer.3.attention...`` -> 3), or None."""
    found = _LAYER.search(name)
    return int(found.group(1)) if found else None


def module_name(name: str) -> str:
    """A short module label: ``...layer.3.attention.self.query.weight`` -> ``query``.

    A generic last component (``dense``) keeps the path after the layer index instead
    (``attention.output.dense``) so that different matrices never share a label.
    """
    path = name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name
    found = _LAYER.search(path + ".")
    tail = path[found.end() :] if found else path
    last = tail.rsplit(".", 1)[-1]
    return tail if last in _GENERIC_MODULES and tail else last


def row_layout(name: str, shape: tuple[int, ...]) -> RowLayout | None:
    """Which axis holds the output units of weight ``name``, or None for 0-D/1-D tensors.

    Conventions (as PEFT's DoRA): Linear ``(out, in)`` -> rows as stored; conv ``(out, in, *k)`` ->
    one row per output channel; embedding ``(num_embeddings, dim)`` -> one row per embedding
    dimension (PEFT treats embeddings as fan-in-fan-out); ``Conv1D`` ``(in, out)`` -> transposed.
    """
    if len(shape) < 2:
        return None
    if len(shape) > 2:
        return "conv"
    if _EMBEDDING.search(name):
        return "embedding"
    if _TRANSPOSED.search(name):
        return "transposed"
    return "linear"


def as_rows(weight: torch.Tensor, layout: RowLayout) -> torch.Tensor:
    """View ``weight`` as ``(k, features)``, one row per output unit (no copy where possible)."""
    if layout == "conv":
        return weight.reshape(weight.shape[0], -1)
    if layout in ("embedding", "transposed"):
        return weight.T
    return weight


def is_default_analysed(name: str, shape: tuple[int, ...]) -> bool:
    """The default selection: 2-D ``.weight`` tensors of linear layers (not embeddings)."""
    return name.endswith(".weight") and row_layout(name, shape) in ("linear", "transposed")


@dataclass
class NameMatch:
    """Base and tuned tensor names paired up; names found on one side only are kept, not dropped."""

    pairs: list[tuple[str, str]] = field(default_factory=list)  # (base name, tuned name)
    base_only: list[str] = field(default_factory=list)
    tuned_only: list[str] = field(default_factory=list)


def match_names(base_names: list[str], tuned_names: list[str]) -> NameMatch:
    """Pair names across wrapper prefixes and one architecture prefix.

    First by :func:`canonical_name`; then, for what is left, by the most common extra leading
    path on one side (``bert.encoder.layer.0...`` in a classifier vs ``encoder.layer.0...`` in
    the bare encoder).
    """
    base_by_canon = {canonical_name(n): n for n in base_names}
    tuned_by_canon = {canonical_name(n): n for n in tuned_names}
    pairs = {c: (base_by_canon[c], tuned_by_canon[c]) for c in base_by_canon if c in tuned_by_canon}
    left_base = {c: n for c, n in base_by_canon.items() if c not in pairs}
    left_tuned = {c: n for c, n in tuned_by_canon.items() if c not in pairs}
    for longer, shorter, swap in ((left_tuned, left_base, False), (left_base, left_tuned, True)):
        prefix = _common_extra_prefix(list(longer), set(shorter))
        if prefix is None:
            continue
        for canon in [c for c in longer if c.startswith(prefix) and c[len(prefix) :] in shorter]:
            short = canon[len(prefix) :]
            base_name, tuned_name = (
                (longer[canon], shorter[short]) if swap else (shorter[short], longer[canon])
            )
            pairs[canon] = (base_name, tuned_name)
            del longer[canon], shorter[short]
    order = {n: i for i, n in enumerate(base_names)}
    return NameMatch(
        pairs=sorted(pairs.values(), key=lambda p: order[p[0]]),
        base_only=sorted(left_base.values(), key=order.__getitem__),
        tuned_only=sorted(left_tuned.values()),
    )


def _common_extra_prefix(longer: list[str], shorter: set[str]) -> str | None:
    counts: Counter[str] = Counter()
    for name in longer:
        parts = name.split(".")
        for i in range(1, min(len(parts), 4)):
            if ".".join(parts[i:]) in shorter:
                counts[".".join(parts[:i]) + "."] += 1
                break
    return counts.most_common(1)[0][0] if counts else None
