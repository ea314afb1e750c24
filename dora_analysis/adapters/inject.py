"""Put LoRA/DoRA wrappers on a model's ``nn.Linear`` modules, and fold them back out for export.

Target matching follows PEFT's ``target_modules``: a string is a regular expression matched against
the whole module name (``re.fullmatch``); a sequence matches names equal to an entry or ending in
``"." + entry``. ``modules_to_save`` entries match the same way (suffix at a dot boundary).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from torch import nn

from dora_analysis.adapters.dora import DoRALinear
from dora_analysis.adapters.lora import LoRALinear
from dora_analysis.errors import InputError

__all__ = [
    "inject_adapters",
    "init_adapter_parameters",
    "merge_adapters",
    "adapter_modules",
    "matches_target",
    "plain_modules",
    "MODULES_TO_SAVE_ATTR",
]

Method = Literal["dora", "lora", "magnitude"]

# The model attribute that records the names of fully trainable modules (PEFT's modules_to_save).
MODULES_TO_SAVE_ATTR = "_adapter_modules_to_save"


def matches_target(name: str, targets: str | Sequence[str]) -> bool:
    """PEFT's rule: regex fullmatch for a string; equality or ``.suffix`` for a sequence."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def adapter_modules(model: nn.Module) -> dict[str, LoRALinear | DoRALinear]:
    """The wrapped modules of ``model`` by name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, DoRALinear))}


def plain_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules, not descending into existing wrappers."""
    inside = tuple(n + "." for n in adapter_modules(model))
    return [(n, m) for n, m in model.named_modules() if not (inside and n.startswith(inside))]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _some_names(modules: list[tuple[str, nn.Module]]) -> str:
    """A few existing names: the distinct last components of the Linear modules, and one full path."""
    linear = [n for n, m in modules if n and isinstance(m, nn.Linear)]
    if not linear:
        return "the model has no nn.Linear modules"
    tails = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in linear))
    return f"Linear modules are named {', '.join(tails[:8])} (e.g. {linear[0]})"


def _describe_targets(targets: str | Sequence[str]) -> str:
    return repr(targets) if isinstance(targets, str) else repr(list(targets))


def inject_adapters(
    model: nn.Module,
    method: Method = "dora",
    targets: str | Sequence[str] = ("query", "value"),
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    rslora: bool = False,
    *,
    modules_to_save: Sequence[str] = (),
    detach_norm: bool = True,
    rank_of: dict[str, int] | None = None,
    alpha_of: dict[str, float] | None = None,
) -> list[str]:
    """Wrap the matching ``nn.Linear`` modules of ``model`` in place and freeze everything else.

    Args:
        model: modified in place (wrappers replace the matched modules).
        method: ``"dora"`` (:class:`DoRALinear`), ``"lora"`` (:class:`LoRALinear`) or ``"magnitude"``
            (DoRA's magnitude-only mode, paper Table 6: only ``m`` trains).
        targets: module names (suffix match) or one regex (full match), as PEFT's ``target_modules``.
        modules_to_save: modules (suffix match) kept fully trainable, e.g. a classifier head; saved by
            :func:`~dora_analysis.adapters.peft_format.save_adapter` as PEFT's ``modules_to_save``.
        detach_norm: DoRA only, see :class:`DoRALinear`.
        rank_of, alpha_of: per-module overrides of ``r`` / ``alpha`` by full module name.

    Returns:
        The names of the wrapped modules, in module order.

    Raises:
        InputError: a target or a ``modules_to_save`` entry matches no module, or a target matches
            only modules that are not ``nn.Linear``.
    """
    if method not in ("dora", "lora", "magnitude"):
        raise ValueError(f"method must be 'dora', 'lora' or 'magnitude', got {method!r}")
    if adapter_modules(model):
        raise InputError.of(type(model).__name__, "the model already holds adapters; inject them once")
    modules = plain_modules(model)
    keep = [n for n, _ in modules if n and matches_target(n, list(modules_to_save))]
    missing_keep = [t for t in modules_to_save if not any(matches_target(n, [t]) for n in keep)]
    matched = [
        (n, m)
        for n, m in modules
        if n and matches_target(n, targets) and not any(n == k or n.startswith(k + ".") for k in keep)
    ]
    linear = [(n, m) for n, m in matched if isinstance(m, nn.Linear)]
    if not linear or missing_keep:
        what = (
            f"modules_to_save {list(missing_keep)}"
            if missing_keep
            else f"targets {_describe_targets(targets)}"
        )
        found = "no module" if not matched else f"only non-Linear modules (e.g. {matched[0][0]})"
        raise InputError.of(type(model).__name__, f"{what} match {found}; {_some_names(modules)}")
    model.requires_grad_(False)
    wrapped = []
    for name, base in linear:
        rank = (rank_of or {}).get(name, 0 if method == "magnitude" else r)
        a = (alpha_of or {}).get(name, alpha)
        if method == "lora":
            module: nn.Module = LoRALinear(base, rank, a, dropout=dropout, rslora=rslora)
        else:
            module = DoRALinear(base, rank, a, dropout=dropout, rslora=rslora, detach_norm=detach_norm)
        _set_module(model, name, module)
        wrapped.append(name)
    for name in keep:
        model.get_submodule(name).requires_grad_(True)
    setattr(model, MODULES_TO_SAVE_ATTR, list(keep))
    return wrapped


def init_adapter_parameters(model: nn.Module) -> list[str]:
    """Initialise every adapter as a fresh one (``A`` kaiming-uniform, ``B = 0``, DoRA's ``m = ||W0||_c``).

    For a model built on the meta device: :func:`inject_adapters` on the meta model, then
    ``to_empty()`` and the base weights loaded, then this. Refuses (``RuntimeError``) while any
    parameter or buffer outside the adapters' own ``lora_A``/``lora_B``/``magnitude`` is still on meta:
    the magnitude computed from a weight not yet loaded would be silently wrong. Returns the names.
    """
    own = {"lora_A", "lora_B", "magnitude"}
    still_meta = [
        name
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
        if tensor.is_meta and name.rsplit(".", 1)[-1] not in own
    ]
    if still_meta:
        more = f" and {len(still_meta) - 3} more" if len(still_meta) > 3 else ""
        raise RuntimeError(
            f"init_adapter_parameters: {', '.join(still_meta[:3])}{more} still on the meta device; "
            "load the base weights first (to_empty() + load_state_dict())"
        )
    wrappers = adapter_modules(model)
    for module in wrappers.values():
        module.reset_adapter_parameters()
    return list(wrappers)


def merge_adapters(model: nn.Module) -> nn.Module:
    """Replace every wrapper by a plain ``nn.Linear`` holding its merged weight; returns ``model``.

    The new layers reuse the base layers' bias; their weight is trainable as in an ordinary model.
    """
    for name, module in adapter_modules(model).items():
        base = module.base
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        merged = merged.to(device=base.weight.device, dtype=base.weight.dtype)
        merged.weight = nn.Parameter(module.merged_weight(), requires_grad=True)
        if base.bias is not None:
            merged.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=True)
        _set_module(model, name, merged)
    if hasattr(model, MODULES_TO_SAVE_ATTR):
        delattr(model, MODULES_TO_SAVE_ATTR)
    return model
