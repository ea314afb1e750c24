"""Which stored modules PEFT would build an adapter layer on: ``target_modules`` as PEFT matches them.

PEFT (0.21, ``check_target_module_exists``) builds a LoRA layer on a module only when its name
matches ``target_modules`` (a string: ``re.fullmatch``; a list: the name or a ``.``-suffix of it),
restricted by ``layers_to_transform``/``layers_pattern``, and not ``exclude_modules`` or a
``modules_to_save`` module. Factors stored for any other module are never loaded, and an adapter
whose targets match nothing is refused when it is built; both are refused here, never guessed.
"""

from __future__ import annotations

import re

from dora_analysis.errors import InputError, first_line
from dora_analysis.readers._common import short_repr
from dora_analysis.readers.adapter_config import AdapterConfig

__all__ = ["is_targeted", "check_targets"]

_ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer but the output head


def is_targeted(config: AdapterConfig, module: str) -> bool:
    """Whether PEFT would build an adapter layer on ``module`` (its path below ``base_model.model.``)."""
    if _excluded(config, module):
        return False
    targets = config.target_modules
    if targets is None or targets == _ALL_LINEAR:
        return True  # None: PEFT fills in the model family's defaults; the stored keys are all we know
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    found = module in targets or any(module.endswith(f".{t}") for t in targets)
    if module in targets or not found or _no_layer_filter(config.layers_to_transform):
        return found
    return _layer_index(config, module) in _as_list(config.layers_to_transform)


def check_targets(config: AdapterConfig, source: object, modules: list[str]) -> None:
    """Refuse factors PEFT would not load (:class:`InputError` naming ``source`` and the module)."""
    if config.target_parameters:
        raise InputError.of(
            config.path, "target_parameters (LoRA on raw parameters) is not supported; only target_modules"
        )
    try:
        untargeted = [m for m in modules if not is_targeted(config, m)]
    except (re.error, RecursionError, OverflowError) as e:
        raise InputError.of(
            config.path,
            f"target_modules, exclude_modules or modules_to_save is not a valid pattern ({first_line(e)})",
        ) from None
    if modules and len(untargeted) == len(modules):
        raise InputError.of(
            config.path,
            f"target_modules {short_repr(config.target_modules)} match none of the adapter's "
            f"{len(modules)} modules (e.g. {short_repr(modules[0])}); PEFT refuses to build it",
        )
    if untargeted:
        raise InputError.of(
            source,
            f"factors stored for a module that target_modules {short_repr(config.target_modules)} "
            "does not select (or exclude_modules excludes); PEFT would not load them",
            tensor=untargeted[0],
        )


def _excluded(config: AdapterConfig, module: str) -> bool:
    excluded = config.exclude_modules
    if isinstance(excluded, str) and re.fullmatch(excluded, module):
        return True
    if isinstance(excluded, list) and (module in excluded or any(module.endswith(f".{e}") for e in excluded)):
        return True
    # PEFT never puts an adapter layer inside a modules_to_save module
    return any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in config.modules_to_save)


def _no_layer_filter(layers: int | list[int] | None) -> bool:
    return layers is None or layers == []


def _as_list(layers: int | list[int] | None) -> list[int]:
    return [layers] if isinstance(layers, int) else list(layers or [])


def _layer_index(config: AdapterConfig, module: str) -> int | None:
    """The first numbered segment after ``layers_pattern`` (any segment when none is given), as PEFT reads it."""
    patterns = config.layers_pattern
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
            if match is not None:
                break
    return int(match["idx"]) if match else None
