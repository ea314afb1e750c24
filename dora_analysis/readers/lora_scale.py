"""The one rule for a LoRA update's scale ``s`` in ``W = W0 + s * B @ A`` (PEFT's ``scaling``).

Readers (adapter configs, NVlabs state dicts) and the adapter layers all take it from here.
"""

from __future__ import annotations

import math

__all__ = ["lora_scale"]


def lora_scale(alpha: float, r: int, rslora: bool = False) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (0 when r == 0: a magnitude-only module).

    Example:
        >>> lora_scale(16, 4), lora_scale(16, 4, rslora=True)
        (4.0, 8.0)
    """
    if r == 0:
        return 0.0
    return alpha / math.sqrt(r) if rslora else alpha / r
