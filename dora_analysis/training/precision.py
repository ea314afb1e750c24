"""Device and numeric precision of a run: where it trains, autocast, and fp16's gradient scaling."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch

from dora_analysis.devices import resolve_device

__all__ = ["Precision", "PRECISIONS", "check_device", "autocast", "grad_scaler"]

Precision = Literal["fp32", "bf16", "fp16"]

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_device(device: str) -> torch.device:
    """``device`` as a torch device this machine has and training supports; an :class:`InputError` otherwise."""
    return resolve_device(device, ("cpu", "cuda", "mps", "xpu"), "training")


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """``torch.autocast`` to bf16/fp16 on ``device``; nothing for fp32 (weights stay float32 throughout)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A loss scaler that works for fp16 (small gradients would underflow) and does nothing otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
