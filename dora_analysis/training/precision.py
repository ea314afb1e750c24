"""Device and numeric precision of a run: where it trains, autocast, and fp16's gradient scaling."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch

from dora_analysis.errors import InputError

__all__ = ["Precision", "PRECISIONS", "check_device", "autocast", "grad_scaler"]

Precision = Literal["fp32", "bf16", "fp16"]

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_device(device: str) -> torch.device:
    """``device`` as a torch device this machine has; an :class:`InputError` otherwise."""
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise InputError.of("--device", f"not a torch device: {device!r} ({error})") from None
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError.of("--device", f"{device}: torch {torch.__version__} sees no CUDA GPU here")
        if chosen.index is not None and chosen.index >= count:
            raise InputError.of("--device", f"{device}: only {count} CUDA GPU(s) here")
    elif chosen.type == "mps" and not torch.backends.mps.is_available():
        raise InputError.of("--device", f"{device}: Apple's MPS is not available here")
    elif chosen.type not in ("cpu", "cuda", "mps", "xpu"):
        raise InputError.of("--device", f"{device}: training supports cpu, cuda, mps and xpu")
    return chosen


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """``torch.autocast`` to bf16/fp16 on ``device``; nothing for fp32 (weights stay float32 throughout)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A loss scaler that works for fp16 (small gradients would underflow) and does nothing otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
