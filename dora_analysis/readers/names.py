"""What a tensor's name says: wrapper prefixes, layer index, module, and which axis holds the rows.

Pure string logic (plus a reshape in :func:`as_rows`); no file access, no statistics.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch

__all__ = [
    "WRAPPER_PREFIXES",
    "strip_prefixes",
    "canonical_name",
    "layer_index",
    "module_name",
    "NameParts",
    "split_name",
    "RowLayout",
    "row_layout",
    "name_layout",
    "as_rows",
    "NameMatch",
    "match_names",
    "is_default_analysed",
]

# Prefixes that wrappers add in front of the same weights: DDP, torch.compile, PEFT, and the
# ``model.`` of ``*ForCausalLM`` classes.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.", "model.")

RowLayout = Literal["linear", "conv", "embedding", "transposed"]

_EMBEDDING = re.compile(r"(^|\.)(embed\w*|\w*embeddings?|wte|wpe|shared|relative_attention_bias)(\.|$)")


# What every _EMBEDDING match contains: substring tests that spare most names its slow \w* scan.
def _maybe_embedding(name: str) -> bool:
    return (
        "embed" in name
        or "wte" in name
        or "wpe" in name
        or "shared" in name
        or "relative_attention_bias" in name
    )


# Names that are nn.Embedding in every family we know; other embed* names (GPT-NeoX's ``embed_out``
# is a Linear) are a guess without the model's config.
_SURE_EMBEDDING = re.compile(
    r"(^|\.)(\w*_embeddings?|embed_tokens|embed_positions|wte|wpe|shared|relative_attention_bias)\.weight$"
)
# transformers' Conv1D (GPT-2 family) stores (in, out); GPTBigCode and Qwen-1 use nn.Linear under the
# same names, so without a config these are always a guess. A ``<one of these>.weight`` name is read
# as Conv1D (a string test, not a regex: it runs for every tensor).
_CONV1D_NAMES = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})
_LAYER = re.compile(r"(?:^|\.)(\d+)\.")
_GENERIC_MODULES = {"dense", "linear", "proj", "fc"}


def strip_prefixes(name: str, prefixes: tuple[str, ...]) -> str:
    """``name`` without any of ``prefixes`` at its start, however many and in whatever order."""
    while name.startswith(prefixes):  # one call per prefix removed, plus one (it runs for every name)
        for prefix in prefixes:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
    return name


@functools.lru_cache(maxsize=1 << 18)
def canonical_name(name: str) -> str:
    """``name`` without any leading wrapper prefixes (see :data:`WRAPPER_PREFIXES`).

    Cached: reading, planning and labelling each ask it of every tensor name.
    """
    return strip_prefixes(name, WRAPPER_PREFIXES)


# Attributes under which libraries keep a whole model body (``bert.encoder...``, ``transformer.h...``):
# not a stack of their own.
_BODY_PREFIXES = frozenset(
    {
        "model", "transformer", "base_model", "backbone", "bert", "roberta", "xlm_roberta", "deberta",
        "electra", "albert", "distilbert", "gpt_neox", "vit", "mpnet", "camembert", "gpt2",
    }
)  # fmt: skip
# Submodules that are a stack of their own, and the label they get.
_STACK_WORDS = {
    "encoder": "encoder",
    "decoder": "decoder",
    "text_model": "text",
    "text_encoder": "text",
    "language_model": "text",
    "vision_model": "vision",
    "vision_tower": "vision",
    "vision_encoder": "vision",
    "visual": "vision",
    "audio_tower": "audio",
    "audio_model": "audio",
}
#: The stack of a model with one stack of blocks (GPT-2, LLaMA, BERT without an ``encoder.`` prefix).
SINGLE_STACK = "model"
_SUBLAYER = re.compile(r"^layer\.\d+\.")  # T5: block.<i>.layer.<j>.SelfAttention...: j is the sublayer


class NameParts(NamedTuple):
    """Where a tensor sits: ``stack`` (``encoder``, ``decoder``, ``vision``, ``text.encoder``, ...),
    ``layer`` (the block index, None outside the blocks) and ``module`` (the path inside the block:
    ``self_attn.q_proj``, ``encoder_attn.q_proj``, ``attention.self.query``). A named tuple: one is
    built per tensor."""

    stack: str
    layer: int | None
    module: str


def split_name(name: str) -> NameParts:
    """``stack``/``layer``/``module`` of a tensor name, so that different matrices never share a label.

    Examples: ``model.decoder.layers.3.encoder_attn.q_proj.weight`` -> (decoder, 3, encoder_attn.q_proj);
    ``text_model.encoder.layers.0.self_attn.q_proj.weight`` -> (text.encoder, 0, self_attn.q_proj);
    ``transformer.h.2.attn.c_attn.weight`` -> (model, 2, attn.c_attn); ``lm_head.weight`` ->
    (model, None, lm_head). Wrapper and body prefixes (``module.``, ``bert.``, ``transformer.``) are
    dropped; a prefix that is neither a body nor a known stack word is kept in the stack.
    """
    path = canonical_name(name)
    if path.endswith((".weight", ".bias")):
        path = path.rsplit(".", 1)[0]
    parts = path.split(".")
    # the block index: the first all-decimal part that is neither first nor last (it runs per
    # tensor, so a plain loop; isdecimal, not isdigit: int() refuses superscripts)
    index = next((i for i in range(1, len(parts) - 1) if parts[i].isdecimal()), None)
    if index is None:
        before, layer, module = [], None, parts
        while len(module) > 1 and (module[0] in _BODY_PREFIXES or module[0] in _STACK_WORDS):
            before.append(module[0])
            module = module[1:]
        module_path = ".".join(module)
    else:
        before, layer = parts[: index - 1], int(parts[index])
        module_path = ".".join(parts[index + 1 :])
        if module_path.startswith("layer."):
            module_path = _SUBLAYER.sub("", module_path)
    words = [_STACK_WORDS.get(p, p) for p in before if p not in _BODY_PREFIXES]
    # tuple.__new__: the named tuple without its Python-level __new__ (one per tensor)
    return tuple.__new__(NameParts, (".".join(words) or SINGLE_STACK, layer, module_path))


def layer_index(name: str) -> int | None:
    """The block index of ``name`` (``encoder.layer.3.attention...`` -> 3), or None; see :func:`split_name`."""
    return split_name(name).layer


def module_name(name: str) -> str:
    """The module path inside its block (``...layer.3.attention.self.query.weight`` ->
    ``attention.self.query``); see :func:`split_name`."""
    return split_name(name).module


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
    if _maybe_embedding(name) and _EMBEDDING.search(name):
        return "embedding"
    stem = name[:-1] if name.endswith("\n") else name  # as a regex's ``$`` would read it
    if stem.endswith(".weight") and stem[:-7].rsplit(".", 1)[-1] in _CONV1D_NAMES:
        return "transposed"
    return "linear"


def name_layout(name: str, shape: tuple[int, ...]) -> tuple[RowLayout | None, bool]:
    """:func:`row_layout` and whether the name leaves it ambiguous (``c_attn`` may be GPT-2's Conv1D or
    a Linear; ``embed_out`` may be an Embedding or a Linear): only the model's config can tell."""
    layout = row_layout(name, shape)
    if layout == "transposed":
        return layout, True
    if layout == "embedding" and len(shape) == 2:
        return layout, not _SURE_EMBEDDING.search(name)
    return layout, False


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
