"""Reading and checking an ``adapter_config.json`` (PEFT, or the NVlabs PEFT fork)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from dora_analysis.errors import InputError
from dora_analysis.readers._common import first_line

__all__ = ["AdapterConfig", "read_adapter_config", "pattern_value"]


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of ``adapter_config.json`` that decide merged weights."""

    path: Path  # the adapter_config.json file, for messages
    peft_type: str  # "LORA" (PEFT) or "DORA" (the NVlabs fork)
    r: int | None
    lora_alpha: float | None
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)  # module-name pattern -> r
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # module-name pattern -> lora_alpha
    base_model_name_or_path: str | None = None

    def scale(self, module: str, rank: int) -> float:
        """``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) for ``module``, patterns applied as PEFT does.

        ``module`` is the path PEFT saw (the adapter key without ``base_model.model.``). Raises
        :class:`InputError` when the config's rank for the module differs from the stored ``rank``.
        """
        if self.r is None or self.lora_alpha is None:
            raise InputError.of(self.path, "needs both 'r' and 'lora_alpha'")
        r = int(pattern_value(self.rank_pattern, module, self.r))
        alpha = float(pattern_value(self.alpha_pattern, module, self.lora_alpha))
        if r != rank:
            raise InputError.of(
                self.path,
                f"the config gives rank r={r} for this module but its stored lora_A has {rank} rows",
                tensor=module,
            )
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def pattern_value(patterns: dict, module: str, default: object) -> object:
    """PEFT's ``get_pattern_key``: the first pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$", module)``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def read_adapter_config(path: Path, *, require_rank: bool = True) -> AdapterConfig:
    """Parse ``path`` (an ``adapter_config.json``); ``InputError`` for missing ``r``/``lora_alpha``."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError.of(path, f"adapter config is not valid JSON ({first_line(e)})") from None
    if not isinstance(raw, dict):
        raise InputError.of(path, "adapter config is not a JSON object")
    peft_type = str(raw.get("peft_type") or "LORA").upper()
    if peft_type not in ("LORA", "DORA"):
        raise InputError.of(
            path,
            f"peft_type is {raw.get('peft_type')!r}; only LoRA/DoRA adapters (peft_type LORA) can be merged",
        )
    for key in ("r", "lora_alpha"):
        if require_rank and raw.get(key) is None:
            raise InputError.of(
                path, f"adapter config is missing {key!r} (needed for the scale lora_alpha / r)"
            )
    try:
        r = None if raw.get("r") is None else int(raw["r"])
        alpha = None if raw.get("lora_alpha") is None else float(raw["lora_alpha"])
        rank_pattern = {str(k): int(v) for k, v in (raw.get("rank_pattern") or {}).items()}
        alpha_pattern = {str(k): float(v) for k, v in (raw.get("alpha_pattern") or {}).items()}
    except (TypeError, ValueError, AttributeError) as e:
        raise InputError.of(
            path, f"adapter config has a non-numeric r, lora_alpha or pattern ({first_line(e)})"
        ) from None
    if r is not None and r <= 0:
        raise InputError.of(path, f"adapter config has r={r}; expected a positive rank")
    return AdapterConfig(
        path=path,
        peft_type=peft_type,
        r=r,
        lora_alpha=alpha,
        use_rslora=bool(raw.get("use_rslora", False)),
        use_dora=bool(raw.get("use_dora", False)),
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        base_model_name_or_path=raw.get("base_model_name_or_path"),
    )
