"""The one parser of ``adapter_config.json`` (PEFT, or the NVlabs PEFT fork), and PEFT's pattern rule.

Both the readers (merging an adapter over its base) and :func:`dora_analysis.load_adapter` read
adapter configs through :func:`read_adapter_config`. Every field that decides merged weights is
type-checked, not coerced: ``"use_dora": "false"`` (a string) and ``r: 4.9`` are refused, as are
non-finite alphas, bad regular expressions in ``rank_pattern``/``alpha_pattern`` and integers of
more than 20 digits (the file is read with :func:`~dora_analysis.readers.json_file.read_json`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from dora_analysis.errors import InputError, first_line
from dora_analysis.readers._common import short_repr
from dora_analysis.readers.json_file import read_json_object
from dora_analysis.readers.lora_scale import lora_scale

__all__ = ["AdapterConfig", "read_adapter_config", "pattern_value"]

# An adapter config is a few KB; 1 MB leaves room for long module lists and patterns.
_MAX_CONFIG_BYTES = 1024 * 1024
_BOOLEANS = ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias")


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of ``adapter_config.json`` that decide merged weights, checked.

    ``options`` keeps every other field as read (JSON values), for callers that refuse options
    they do not support (``load_adapter``); the layer-selection fields and ``init_lora_weights`` are
    both checked here and kept there.
    """

    path: Path  # the adapter_config.json file, for messages
    peft_type: str  # "LORA" (PEFT) or "DORA" (the NVlabs fork)
    r: int | None
    lora_alpha: float | None
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    lora_bias: bool = False
    lora_dropout: float = 0.0
    rank_pattern: dict[str, int] = field(default_factory=dict)  # module-name pattern -> r
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # module-name pattern -> lora_alpha
    base_model_name_or_path: str | None = None
    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    modules_to_save: list[str] = field(default_factory=list)
    init_lora_weights: bool | str = True
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    target_parameters: list[str] | None = None
    options: dict[str, object] = field(default_factory=dict)

    @property
    def rewrites_base(self) -> bool:
        """Whether PEFT's ``init_lora_weights`` rewrites the base weights when it builds the adapter.

        PiSSA, CorDA, OLoRA, LoftQ and LoRA-GA subtract their initial update from the base (peft 0.21
        ``LoraLayer.update_layer``), so ``base + s * B @ A`` is not the fine-tuned weight; an adapter
        converted with ``path_initial_model_for_weight_conversion`` is saved with ``true`` instead.
        """
        init = self.init_lora_weights
        if not isinstance(init, str):
            return False
        init = init.lower()
        return init.startswith(("pissa", "corda")) or init in ("olora", "loftq", "lora_ga")

    def rank(self, module: str) -> int:
        """The rank PEFT gives ``module`` (``rank_pattern`` applied)."""
        if self.r is None:
            raise InputError.of(self.path, "needs 'r'")
        return pattern_value(self.rank_pattern, module, self.r)

    def alpha(self, module: str) -> float:
        """The ``lora_alpha`` PEFT gives ``module`` (``alpha_pattern`` applied)."""
        if self.lora_alpha is None:
            raise InputError.of(self.path, "needs 'lora_alpha'")
        return pattern_value(self.alpha_pattern, module, self.lora_alpha)

    def scale(self, module: str, rank: int) -> float:
        """``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) for ``module``, patterns applied as PEFT does.

        ``module`` is the path PEFT saw (the adapter key without ``base_model.model.``). Raises
        :class:`InputError` when the config's rank for the module differs from the stored ``rank``.
        """
        if self.r is None or self.lora_alpha is None:
            raise InputError.of(self.path, "needs both 'r' and 'lora_alpha'")
        r, alpha = self.rank(module), self.alpha(module)
        if r != rank:
            raise InputError.of(
                self.path,
                f"the config gives rank r={r} for this module but its stored lora_A has {rank} rows",
                tensor=module,
            )
        return lora_scale(alpha, r, self.use_rslora)


def pattern_value(patterns: dict, module: str, default):
    """PEFT's ``get_pattern_key``: the value of the first pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$", module)``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def read_adapter_config(path: Path, *, require_rank: bool = True) -> AdapterConfig:
    """Parse and check ``path`` (an ``adapter_config.json``).

    Raises :class:`InputError` (one line naming the file and field) for a file that is not a JSON
    object, a ``peft_type`` other than LORA/DORA, missing ``r``/``lora_alpha`` (when ``require_rank``),
    or any field of the wrong type or range (see the module docstring).
    """
    path = Path(path)
    raw = read_json_object(path, "adapter config", max_bytes=_MAX_CONFIG_BYTES)
    peft_type = raw.get("peft_type")
    if peft_type is not None and not isinstance(peft_type, str):
        raise InputError.of(path, f"peft_type is {short_repr(peft_type)}; expected a string such as 'LORA'")
    peft_type = (peft_type or "LORA").upper()
    if peft_type not in ("LORA", "DORA"):
        raise InputError.of(
            path,
            f"peft_type is {short_repr(raw.get('peft_type'))}; only LoRA/DoRA adapters (peft_type LORA) can be merged",
        )
    for key in ("r", "lora_alpha"):
        if require_rank and raw.get(key) is None:
            raise InputError.of(
                path, f"adapter config is missing {key!r} (needed for the scale lora_alpha / r)"
            )
    flags = {key: _boolean(path, raw, key) for key in _BOOLEANS}
    known = {
        "peft_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "rank_pattern",
        "alpha_pattern",
        "base_model_name_or_path",
        "target_modules",
        "exclude_modules",
        "modules_to_save",
        *_BOOLEANS,
    }
    dropout = _number(path, "lora_dropout", raw.get("lora_dropout"))
    return AdapterConfig(
        path=path,
        peft_type=peft_type,
        r=None if raw.get("r") is None else _rank(path, "r", raw["r"]),
        lora_alpha=None if raw.get("lora_alpha") is None else _number(path, "lora_alpha", raw["lora_alpha"]),
        lora_dropout=0.0 if dropout is None else dropout,
        rank_pattern={
            k: _rank(path, f"rank_pattern[{k!r}]", v) for k, v in _patterns(path, raw, "rank_pattern")
        },
        alpha_pattern={
            k: _number(path, f"alpha_pattern[{k!r}]", v) for k, v in _patterns(path, raw, "alpha_pattern")
        },
        base_model_name_or_path=_string(path, raw, "base_model_name_or_path"),
        target_modules=_names(path, raw, "target_modules"),
        exclude_modules=_names(path, raw, "exclude_modules"),
        modules_to_save=_list_of_names(path, raw, "modules_to_save"),
        init_lora_weights=_init(path, raw),
        layers_to_transform=_layers(path, raw),
        layers_pattern=_names(path, raw, "layers_pattern"),
        target_parameters=_list_of_names(path, raw, "target_parameters") or None,
        options={k: v for k, v in raw.items() if k not in known},
        **flags,
    )


def _boolean(path: Path, raw: dict, key: str) -> bool:
    value = raw.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InputError.of(path, f"{key} is {short_repr(value)}; expected true or false (a JSON boolean)")
    return value


def _rank(path: Path, key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError.of(path, f"{key} is {short_repr(value)}; expected a positive integer rank")
    if value <= 0:
        raise InputError.of(path, f"adapter config has {key}={value}; expected a positive rank")
    return value


def _number(path: Path, key: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputError.of(path, f"{key} is {short_repr(value)}; expected a finite number")
    return float(value)


def _patterns(path: Path, raw: dict, key: str) -> list[tuple[str, object]]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise InputError.of(path, f"{key} is {short_repr(value)}; expected an object of pattern -> value")
    for pattern in value:
        try:
            re.compile(rf"(.*\.)?({pattern})$")
        except (re.error, RecursionError, OverflowError) as e:
            raise InputError.of(
                path, f"{key} has an invalid regular expression {short_repr(pattern)} ({first_line(e)})"
            ) from None
    return list(value.items())


def _init(path: Path, raw: dict) -> bool | str:
    value = raw.get("init_lora_weights", True)
    if not isinstance(value, bool | str):
        raise InputError.of(
            path, f"init_lora_weights is {short_repr(value)}; expected true, false or a method name"
        )
    return value


def _layers(path: Path, raw: dict) -> int | list[int] | None:
    value = raw.get("layers_to_transform")
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise InputError.of(
            path, f"layers_to_transform is {short_repr(value)}; expected a layer index or a list of them"
        )
    return list(value)


def _string(path: Path, raw: dict, key: str) -> str | None:
    value = raw.get(key)
    if value is not None and not isinstance(value, str):
        raise InputError.of(path, f"{key} is {short_repr(value)}; expected a string")
    return value


def _names(path: Path, raw: dict, key: str) -> str | list[str] | None:
    value = raw.get(key)
    if value is None or isinstance(value, str):
        return value
    return _list_of_names(path, raw, key)


def _list_of_names(path: Path, raw: dict, key: str) -> list[str]:
    value = raw.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError.of(path, f"{key} is {short_repr(value)}; expected a list of module names")
    return list(value)
