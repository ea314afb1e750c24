"""A live model read as two checkpoints: its pre-trained weights and its current ones.

The analysis only reads :class:`~dora_analysis.readers.base.CheckpointReader` objects, so a model in
memory is shown to it as two of them, named as the model names its parameters:

- the *tuned* side: every adapted module's weight as its live factors (:meth:`LiveReader.low_rank`:
  the analysis then works from the factors, no merged weight is formed), trainable copies
  (PEFT ``modules_to_save``) and, for full fine-tuning, every parameter;
- the *base* side: the frozen weights inside the model (PEFT's ``base_layer``/``original_module``,
  the own layers' ``base``) for adapter models; for full fine-tuning the base checkpoint on disk.

Supported adapter layers: PEFT ``LoraLayer`` (LoRA and DoRA, one active adapter, unmerged) and this
package's :class:`~dora_analysis.adapters.lora.LoRALinear` / :class:`~dora_analysis.adapters.dora.DoRALinear`.
Sharded (FSDP2 ``DTensor``) parameters are gathered when read, one tensor at a time.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dora_analysis.adapters.lora import WrappedLinear
from dora_analysis.errors import InputError
from dora_analysis.factors import merge_low_rank
from dora_analysis.readers.base import EntryReader, LowRankUpdate
from dora_analysis.readers.names import strip_prefixes

__all__ = ["LiveAdapter", "LiveReader", "LiveModel", "live_model", "full_tensor"]

# What DDP, torch.compile and PEFT put in front of the names the model saves its weights under.
LIVE_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` detached, gathered whole where it is an FSDP2 shard (a collective: every rank calls it)."""
    tensor = tensor.detach()
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


@dataclass(frozen=True)
class LiveAdapter:
    """One adapted weight as live tensors: ``W0`` and factors (``lora_A`` ``(r, in)``, ``lora_B``
    ``(out, r)``, conv factors flattened when read), the scale, the DoRA magnitude (None: LoRA)."""

    name: str
    weight: torch.Tensor
    lora_A: torch.Tensor | None
    lora_B: torch.Tensor | None
    scale: float
    magnitude: torch.Tensor | None
    fan_in_fan_out: bool = False

    def update(self) -> LowRankUpdate:
        """The current factors, gathered and detached (a rank-0 update where there are none)."""
        if self.lora_A is None or self.lora_B is None:
            out_dim, in_dim = self.weight.shape[::-1] if self.fan_in_fan_out else self.weight.shape[:2]
            a = torch.zeros(0, in_dim, device=self.weight.device)
            b = torch.zeros(out_dim, 0, device=self.weight.device)
        else:
            a, b = full_tensor(self.lora_A).flatten(1), full_tensor(self.lora_B).flatten(1)
        magnitude = None if self.magnitude is None else full_tensor(self.magnitude).reshape(-1)
        return LowRankUpdate(self.name, a, b, self.scale, magnitude, self.fan_in_fan_out)


Entry = torch.Tensor | LiveAdapter


class LiveReader(EntryReader):
    """A :class:`~dora_analysis.readers.base.CheckpointReader` over tensors of a live model.

    ``source`` is a folder holding the model's ``config.json`` (where the analysis finds the layouts).
    ``get`` returns the live tensor detached (gathered under FSDP2); an adapted weight is merged.
    """

    def __init__(self, source: Path, entries: dict[str, Entry], *, partial: bool) -> None:
        self.source = Path(source)
        self.partial = partial
        self._entries = entries

    def shape(self, name: str) -> tuple[int, ...]:
        entry = self._entry(name)
        return tuple((entry.weight if isinstance(entry, LiveAdapter) else entry).shape)

    def dtype(self, name: str) -> torch.dtype:
        entry = self._entry(name)
        return entry.weight.dtype if isinstance(entry, LiveAdapter) else entry.dtype

    def get(self, name: str) -> torch.Tensor:
        entry = self._entry(name)
        if not isinstance(entry, LiveAdapter):
            return full_tensor(entry)
        weight = full_tensor(entry.weight)
        rows = weight.flatten(1) if weight.dim() > 2 else weight
        return merge_low_rank(rows, entry.update()).reshape(weight.shape)

    def low_rank(self, name: str) -> LowRankUpdate | None:
        entry = self._entry(name)
        return entry.update() if isinstance(entry, LiveAdapter) else None

    def close(self) -> None:
        pass

    def __enter__(self) -> LiveReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class LiveModel:
    """What a model holds: the tuned tensors, the frozen base tensors, and the method they imply."""

    tuned: dict[str, Entry]
    base: dict[str, Entry]
    method: str  # "ft" (no adapter layer found), "lora" or "dora"


def live_model(model: nn.Module) -> LiveModel:
    """Walk ``model`` once: adapted modules, trainable copies and plain parameters by name.

    Raises:
        InputError: a merged adapter, several active adapters, or a PEFT variant other than DoRA.
    """
    tuned: dict[str, Entry] = {}
    base: dict[str, Entry] = {}
    plain: dict[str, torch.Tensor] = {}
    methods: set[str] = set()
    _walk(model, "", tuned, base, plain, methods, set())
    if not methods:  # full fine-tuning: every parameter is tuned, the base comes from disk
        return LiveModel(tuned=_saved_names(plain), base={}, method="ft")
    for name, parameter in plain.items():
        (tuned if parameter.requires_grad else base)[name] = parameter
    method = "dora" if "dora" in methods else "lora"
    return LiveModel(tuned=_saved_names(tuned), base=_saved_names(base), method=method)


def _saved_names(entries: dict[str, Entry]) -> dict[str, Entry]:
    """``entries`` keyed as the model saves them (``tensor`` column as in a checkpoint's comparison)."""
    return {strip_prefixes(name, LIVE_PREFIXES): entry for name, entry in entries.items()}


def _walk(
    module: nn.Module,
    prefix: str,
    tuned: dict[str, Entry],
    base: dict[str, Entry],
    plain: dict[str, torch.Tensor],
    methods: set[str],
    seen: set[int],
) -> None:
    """Fill the dictionaries from ``module`` (path ``prefix``) and, unless it is a wrapper, its children."""
    path = prefix.rstrip(".")
    adapter = _own_adapter(module, path) or _peft_adapter(module, path)
    if adapter is not None:
        tuned[f"{path}.weight"] = adapter
        base[f"{path}.weight"] = adapter.weight
        methods.add("lora" if adapter.magnitude is None else "dora")
        return
    copies = _peft_copies(module)
    if copies is not None:
        original, trained = copies
        for name, parameter in original.named_parameters():
            base[f"{prefix}{name}"] = parameter
        for name, parameter in trained.named_parameters():
            tuned[f"{prefix}{name}"] = parameter
        return
    for name, parameter in module.named_parameters(recurse=False):
        if id(parameter) not in seen:  # a tied weight is named once, as named_parameters() does
            seen.add(id(parameter))
            plain[f"{prefix}{name}"] = parameter
    for name, child in module.named_children():
        _walk(child, f"{prefix}{name}.", tuned, base, plain, methods, seen)


def _own_adapter(module: nn.Module, path: str) -> LiveAdapter | None:
    """This package's LoRALinear/DoRALinear as a :class:`LiveAdapter` (None for other modules)."""
    if not isinstance(module, WrappedLinear):
        return None
    if getattr(module, "merged", False):
        raise InputError.of(path, "the adapter is merged into its base weight; unmerge it to track it")
    magnitude = getattr(module, "magnitude", None)
    return LiveAdapter(path, module.base.weight, module.lora_A, module.lora_B, float(module.scale), magnitude)


def _peft_adapter(module: nn.Module, path: str) -> LiveAdapter | None:
    """A PEFT ``LoraLayer`` as a :class:`LiveAdapter` (None for other modules, or without PEFT loaded)."""
    if "peft" not in sys.modules:  # a PEFT layer cannot exist unless PEFT was imported
        return None
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer):
        return None
    active = list(module.active_adapters)
    if len(active) != 1:
        raise InputError.of(path, f"{len(active)} active adapters {active}; tracking reads exactly one")
    if module.merged_adapters:
        raise InputError.of(path, "the adapter is merged into its base weight; unmerge it to track it")
    name = active[0]
    variant = module.lora_variant.get(name) if hasattr(module, "lora_variant") else None
    if variant is not None and "dora" not in type(variant).__name__.lower():
        raise InputError.of(path, f"LoRA variant {type(variant).__name__} is not LoRA or DoRA")
    weight = module.get_base_layer().weight
    magnitude = module.lora_magnitude_vector[name].weight if name in module.lora_magnitude_vector else None
    scale = float(module.scaling[name])
    if name in module.lora_A:
        a, b = module.lora_A[name].weight, module.lora_B[name].weight
        transposed = bool(getattr(module, "fan_in_fan_out", False))
        return LiveAdapter(path, weight, a, b, scale, magnitude, transposed)
    if name in module.lora_embedding_A:  # PEFT treats an embedding as fan-in-fan-out
        a, b = module.lora_embedding_A[name], module.lora_embedding_B[name]
        return LiveAdapter(path, weight, a, b, scale, magnitude, True)
    return None


def _peft_copies(module: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(original, trained copy)`` of a PEFT ``modules_to_save`` wrapper (None for other modules)."""
    if "peft" not in sys.modules:
        return None
    from peft.utils import ModulesToSaveWrapper

    if not isinstance(module, ModulesToSaveWrapper):
        return None
    active = list(module.active_adapters)
    if len(active) != 1 or active[0] not in module.modules_to_save:
        return None
    return module.original_module, module.modules_to_save[active[0]]
