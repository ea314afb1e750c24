"""Which torch device a command may use: one check for the analysis and the trainer alike."""

from __future__ import annotations

from collections.abc import Collection

import torch

from dora_analysis.errors import InputError, first_line

__all__ = ["parse_device", "resolve_device"]


def parse_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device, checked for syntax only (where it exists is not asked: a Ray
    worker checks that on its own machine).

    Raises:
        InputError: not a torch device name; the message names ``--device``.
    """
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise InputError.of("--device", f"not a torch device: {device!r} ({first_line(error)})") from None


def resolve_device(
    device: str | torch.device, types: Collection[str] | None = None, what: str = ""
) -> torch.device:
    """``device`` checked to be usable on this machine (and, with ``types``, one of those kinds).

    Args:
        device: a torch device name (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ...).
        types: the device types allowed (None: any this machine has); ``what`` names the job in the
            message (``"training"``).
    Raises:
        InputError: not a torch device name, an accelerator this torch build or machine lacks, or a
            type not in ``types``; the message names ``--device``.
    """
    resolved = parse_device(device)
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError.of("--device", f"{device}: torch {torch.__version__} sees no CUDA GPU here")
        if resolved.index is not None and resolved.index >= count:
            raise InputError.of("--device", f"{device}: only {count} CUDA GPU(s) here")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise InputError.of("--device", f"{device}: Apple's MPS is not available here")
    if types is not None and resolved.type not in types:
        raise InputError.of("--device", f"{device}: {what or 'this'} supports {', '.join(types)}")
    return resolved
