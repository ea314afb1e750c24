"""Which axis of a stored weight holds the output units, decided by the model, not by its name.

A weight named ``c_attn`` is GPT-2's transposed ``Conv1D`` ``(in, out)`` in ``gpt2`` but an
``nn.Linear`` ``(out, in)`` in GPTBigCode (StarCoder) and Qwen-1; GPT-NeoX's ``embed_out`` is a Linear
although named like an embedding. So when a ``config.json`` is beside the weights, the model decides:

1. ``config.json`` -> transformers builds the model on the meta device (no memory, no download) and
   each parameter's module type gives its layout (``nn.Linear`` -> linear, ``Conv1D`` -> transposed,
   ``nn.Embedding`` -> embedding, ``nn.ConvNd`` -> conv). ``layout_source`` = ``config``.
2. If transformers cannot build it (a ``trust_remote_code`` model, an unknown ``model_type``): the
   table :data:`CONV1D_MODULES` of the model types that use ``Conv1D`` (from transformers' own
   sources); any other model type has none. ``layout_source`` = ``config-table``.
3. A bare file (no config): the name rule of :func:`~dora_analysis.readers.names.name_layout`,
   ``layout_source`` = ``name``, or ``name-ambiguous`` where the name could be either.
4. ``layout=`` (CLI ``--layout``) overrides all of these for every 2-D weight (except names only
   embeddings have: ``embed_tokens``, ``word_embeddings``, ``wte``...): ``override``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from dora_analysis.errors import InputError
from dora_analysis.readers.json_file import MAX_CONFIG_BYTES, parse_json, read_json
from dora_analysis.readers.names import RowLayout, canonical_name, name_layout

__all__ = [
    "LAYOUT_CHOICES",
    "CONV1D_MODULES",
    "TensorLayout",
    "ModelLayout",
    "find_config",
    "model_layout",
    "model_names",
]

#: ``--layout`` values and the row layout each forces; ``auto`` decides per tensor as above.
LAYOUT_CHOICES: dict[str, RowLayout | None] = {
    "auto": None,
    "linear": "linear",
    "conv1d-transposed": "transposed",
    "embedding": "embedding",
}

#: model_type -> module names that are transformers' ``Conv1D`` (``grep -rn "Conv1D(" transformers/models``).
CONV1D_MODULES: dict[str, frozenset[str]] = {
    "gpt2": frozenset({"c_attn", "q_attn", "c_proj", "c_fc"}),
    "decision_transformer": frozenset({"c_attn", "q_attn", "c_proj", "c_fc"}),
    "imagegpt": frozenset({"c_attn", "q_attn", "c_proj", "c_fc"}),
    "openai-gpt": frozenset({"c_attn", "c_proj", "c_fc"}),
    "clvp": frozenset({"c_fc", "c_proj"}),  # only the decoder MLP: checked with the path below
}


class TensorLayout(NamedTuple):
    """One tensor's row layout (None: 0-D/1-D, nothing to decompose), where it came from, and whether
    it was a guess (``source`` ``name-ambiguous``). A named tuple: one is built per tensor."""

    layout: RowLayout | None
    source: str

    @property
    def ambiguous(self) -> bool:
        return self.source == "name-ambiguous"


# One shared instance per (layout, source): a checkpoint asks for thousands, of a handful of kinds.
_layout = lru_cache(maxsize=None)(TensorLayout)


@dataclass
class ModelLayout:
    """The layout rule of one comparison: an override, a model's module types, a table, or names.

    ``modules`` maps a module path of the instantiated model (``transformer.h.0.attn.c_attn``) to its
    layout; file names are matched to it by their longest common suffix.
    """

    config: Path | None = None
    model_type: str | None = None
    override: RowLayout | None = None
    modules: dict[str, RowLayout] | None = None
    rename: Callable[[str], str] | None = None  # a stored key -> the model's name for it
    _by_suffix: dict[str, set[RowLayout]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for path, layout in (self.modules or {}).items():
            parts = path.split(".")
            # whole paths, and suffixes of two or more parts (``bert.`` dropped or added); a lone
            # leaf (``dense``) would match tensors the model does not have
            for i in range(max(len(parts) - 1, 1)):
                self._by_suffix.setdefault(".".join(parts[i:]), set()).add(layout)

    @property
    def rule(self) -> str:
        """One phrase for ``df.attrs["layout_rule"]``: what decided the layouts."""
        if self.override is not None:
            return f"override: every 2-D weight is {self.override}"
        if self.modules is not None:
            return f"config: module types of transformers' {self.model_type} model ({self.config})"
        if self.model_type is not None:
            return f"config-table: {self.model_type} from {self.config}, Conv1D table"
        return "name: no config.json beside the weights; layouts guessed from tensor names"

    def of(self, name: str, shape: tuple[int, ...]) -> TensorLayout:
        """The layout of stored tensor ``name`` with ``shape``."""
        if len(shape) < 2:
            return _layout(None, "shape")
        if self.override is not None and len(shape) == 2:
            guess, ambiguous = name_layout(name, shape)
            if guess != "embedding" or ambiguous:  # a name only embeddings have stays an embedding
                return _layout(self.override, "override")
            return _layout(guess, "name")
        module = canonical_name(name).rsplit(".", 1)[0] if name.endswith(".weight") else None
        if module is not None and self.modules is not None:
            found = self._lookup(module)
            if found is None and self.rename is not None:
                renamed = self.rename(canonical_name(name))
                found = self._lookup(renamed.rsplit(".", 1)[0]) if renamed.endswith(".weight") else None
            if found is not None:
                return _layout(found, "config")
        if len(shape) > 2:
            return _layout("conv", "shape")
        if module is not None and self.modules is None and self.model_type is not None:
            leaf = module.rsplit(".", 1)[-1]
            conv1d = CONV1D_MODULES.get(self.model_type, frozenset())
            if leaf in conv1d and (self.model_type != "clvp" or ".mlp." in f".{module}."):
                return _layout("transposed", "config-table")
            guess, ambiguous = name_layout(name, shape)
            if guess == "transposed":  # this model type has no Conv1D
                return _layout("linear", "config-table")
            return _layout(guess, "name-ambiguous" if ambiguous else "config-table")
        guess, ambiguous = name_layout(name, shape)
        return _layout(guess, "name-ambiguous" if ambiguous else "name")

    def _lookup(self, module: str) -> RowLayout | None:
        parts = module.split(".")
        for i in range(len(parts)):
            found = self._by_suffix.get(".".join(parts[i:]))
            if found:
                return next(iter(found)) if len(found) == 1 else None
        return None


def find_config(source: Path | str) -> Path | None:
    """``config.json`` in the folder ``source`` or beside the file ``source``, or None."""
    source = Path(source)
    folder = source if source.is_dir() else source.parent
    config = folder / "config.json"
    return config if config.is_file() else None


def model_layout(sources: list[Path | str], override: str | None = None) -> ModelLayout:
    """The layout rule for weights read from ``sources`` (base first): the first ``config.json`` found
    beside one of them decides; ``override`` (a key of :data:`LAYOUT_CHOICES`) replaces it.

    Raises:
        InputError: an unknown ``override``, or a ``config.json`` that is not JSON.
    """
    if override is not None and override not in LAYOUT_CHOICES:
        raise InputError.of(
            "--layout", f"unknown layout {override!r}: expected one of {', '.join(LAYOUT_CHOICES)}"
        )
    forced = LAYOUT_CHOICES.get(override) if override else None
    if forced is not None:
        return ModelLayout(override=forced)
    config = next((c for c in map(find_config, sources) if c is not None), None)
    if config is None:
        return ModelLayout()
    raw = read_json(config, "model config", max_bytes=MAX_CONFIG_BYTES)
    text = json.dumps(raw, sort_keys=True)  # the cache key of the model built from it
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if not isinstance(model_type, str):
        return ModelLayout(config=config)
    built = _module_layouts(text)
    if built is None:
        return ModelLayout(config=config, model_type=model_type)
    return ModelLayout(config=config, model_type=model_type, modules=built[0], rename=built[1])


def model_names(source: Path | str, names: Iterable[str]) -> dict[str, str]:
    """``{the model's own name: stored name}`` for the stored ``names`` that the model described by the
    ``config.json`` beside ``source`` loads under another name (transformers 5 loads ViT's stored
    ``encoder.layer.0.attention.attention.query.weight`` as ``layers.0.attention.q_proj.weight``, and
    PEFT names an adapter's modules after the loaded model). Empty without a config or renamings."""
    rename = model_layout([source]).rename
    if rename is None:
        return {}
    found = {}
    for name in names:
        renamed = rename(canonical_name(name))
        if renamed != canonical_name(name):
            found[renamed] = name
    return found


@lru_cache(maxsize=8)
def _module_layouts(config_text: str) -> tuple[dict[str, RowLayout], Callable[[str], str]] | None:
    """``({module path: layout}, rename)`` of the model ``config_text`` describes, built on the meta
    device; ``rename`` maps a stored key to the model's own name (transformers 5 loads some families
    from older names: GPT-NeoX's ``embed_out`` is the module ``lm_head``). None where transformers
    cannot build the model."""
    try:
        import torch
        import transformers
        from transformers.pytorch_utils import Conv1D

        raw = parse_json("config.json", config_text, "model config")
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # the model's own config checks are not ours to print
        try:
            config = transformers.AutoConfig.for_model(**raw)
            architectures = raw.get("architectures") or []
            model_class = getattr(transformers, architectures[0], None) if architectures else None
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                if model_class is not None:
                    model = model_class(config)
                else:
                    model = transformers.AutoModel.from_config(config)
        finally:
            transformers.logging.set_verbosity(verbosity)
    except Exception:  # remote code, an unknown model type, a config this transformers rejects
        return None
    layouts: dict[str, RowLayout] = {}
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() < 2:
            continue
        if isinstance(module, Conv1D):
            layouts[path] = "transposed"
        elif isinstance(module, torch.nn.Embedding):
            layouts[path] = "embedding"
        elif isinstance(module, torch.nn.Linear):
            layouts[path] = "linear"
        elif isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            layouts[path] = "conv"
    return layouts, _renamer(model)


def _renamer(model: object) -> Callable[[str], str]:
    """transformers' own key renamings for ``model`` (plain renames only; a key that a converter fuses
    or splits keeps its name and falls back to the name rule)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    except Exception:  # an older transformers: stored names are the module names
        return lambda key: key
    if not renamings:
        return lambda key: key

    def rename(key: str) -> str:
        try:
            return rename_source_key(key, renamings, [])[0]
        except Exception:
            return key

    return rename
