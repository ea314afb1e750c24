"""Pieces every reader shares: context-manager plumbing and the training files that are never weights."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from dora_analysis.readers.base import CheckpointReader, LowRankUpdate, StoredTensor

__all__ = [
    "MAX_EMPTY_EXTENT",
    "ReaderMixin",
    "is_training_state_file",
    "WEIGHT_SUFFIXES",
    "short_repr",
    "DEQUANTIZE",
    "stored_tensor_problem",
    "quantized_storage_problem",
]

# A tensor with no elements stores no bytes, but its dimensions still size per-row work (rows,
# masks): beyond this many rows (the product of its non-zero dimensions) it is refused.
MAX_EMPTY_EXTENT = 1 << 16

_FLOAT8 = {
    d
    for d in vars(torch).values()
    if isinstance(d, torch.dtype) and ("float8" in str(d) or "float4" in str(d))
}
DEQUANTIZE = "pass the dequantized weights (bf16/fp16/fp32, e.g. transformers' model.dequantize() then save_pretrained)"
# Companions that bitsandbytes (4/8-bit) and GPTQ/AWQ store beside their packed integer weights.
_QUANTIZED_NAMES = (
    (
        re.compile(r"\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\.[\w.]+)$"),
        "bitsandbytes 4-bit",
    ),
    (re.compile(r"\.(SCB|weight_format)$"), "bitsandbytes 8-bit"),
    (re.compile(r"\.(qweight|qzeros|g_idx)$"), "GPTQ/AWQ packed-integer"),
    (re.compile(r"\.weight_scale(_inv)?$"), "FP8 (scaled)"),
)

_ANY_QUANTIZED = re.compile("|".join(f"(?:{pattern.pattern})" for pattern, _ in _QUANTIZED_NAMES))
# The same over every name at once, one per line: a name's match is one in the joined text too (``$``
# meets the line end), so no hit there means no hit in any name.
_ANY_QUANTIZED_LINE = re.compile(_ANY_QUANTIZED.pattern, re.MULTILINE)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

# Trainer files that hold optimizer/scheduler/RNG state or arguments, never model weights.
_TRAINING_STATE = re.compile(
    r"^(optimizer|scheduler|scaler|training_args|rng_state(_\d+)?)\.(pt|pth|bin)$"
    r"|^(optimizer|scheduler).*\.(pt|pth|bin|safetensors)$"
)


def is_training_state_file(path: Path) -> bool:
    """True for ``optimizer.pt``, ``scheduler.pt``, ``rng_state*.pth``, ``training_args.bin`` and kin."""
    return bool(_TRAINING_STATE.match(path.name))


def stored_tensor_problem(dtype: torch.dtype, shape: tuple[int, ...]) -> str | None:
    """Why a stored tensor of this dtype and shape is refused, or None.

    float8 tensors are quantization codes whose scales live elsewhere: comparing the codes would give
    wrong numbers. A tensor with no elements is refused when its other dimensions exceed
    :data:`MAX_EMPTY_EXTENT` rows (it stores no bytes, so it must cost nothing).
    """
    if dtype in _FLOAT8:
        return f"stored as {str(dtype).replace('torch.', '')} (quantized codes without their scales); {DEQUANTIZE}"
    if 0 in shape and math.prod(d for d in shape if d) > MAX_EMPTY_EXTENT:
        return f"holds no elements but claims shape {list(shape)}; refused (an empty tensor may span at most {MAX_EMPTY_EXTENT} rows)"
    return None


def quantized_storage_problem(names: list[str]) -> tuple[str, str] | None:
    """``(tensor name, problem)`` when the names show quantized storage (bitsandbytes, GPTQ/AWQ, scaled FP8)."""
    if _ANY_QUANTIZED_LINE.search("\n".join(names)) is None:  # one scan at C speed for the usual case
        return None
    for name in names:
        if _ANY_QUANTIZED.search(name) is None:  # one search per name; the kind only on a hit
            continue
        for pattern, kind in _QUANTIZED_NAMES:
            if pattern.search(name):
                return (
                    name,
                    f"{kind} quantized storage (packed codes plus scales, not weights); {DEQUANTIZE}",
                )
    return None


def short_repr(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: messages quote what a file holds, never all of it."""
    text = str(tuple(value)) if isinstance(value, tuple) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ReaderMixin:
    """Context-manager methods and the defaults of a plain reader: no ``low_rank`` factors (not an
    adapter), no ``stored_at`` (tensors only through ``get``)."""

    def low_rank(self, name: str) -> LowRankUpdate | None:
        return None

    def stored_at(self, name: str) -> StoredTensor | None:
        return None

    def close(self) -> None:  # pragma: no cover - overridden where something is open
        pass

    def __enter__(self) -> CheckpointReader:
        return self  # type: ignore[return-value]

    def __exit__(self, *exc: object) -> None:
        self.close()
