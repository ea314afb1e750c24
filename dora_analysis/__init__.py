"""dora_analysis: the magnitude/direction weight-decomposition analysis of the DoRA paper.

Public API (imported lazily, so ``python -m dora_analysis`` starts fast):

- analysis: :func:`compare`, :func:`analyze_series`, :func:`correlations`
- math: :func:`magnitude`, :func:`tensor_delta`
- reading: :func:`open_checkpoint`
- the layer: :class:`LoRALinear`, :class:`DoRALinear`, :func:`inject_adapters`, :func:`merge_adapters`,
  :func:`save_adapter`, :func:`load_adapter`
- training: :func:`train`
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "compare": "dora_analysis.comparison",
    "compare_many": "dora_analysis.comparison",
    "analyze_series": "dora_analysis.series",
    "correlations": "dora_analysis.correlation",
    "magnitude": "dora_analysis.decomposition",
    "tensor_delta": "dora_analysis.decomposition",
    "open_checkpoint": "dora_analysis.readers",
    "LoRALinear": "dora_analysis.lora",
    "DoRALinear": "dora_analysis.dora",
    "inject_adapters": "dora_analysis.inject",
    "merge_adapters": "dora_analysis.inject",
    "save_adapter": "dora_analysis.adapter_io",
    "load_adapter": "dora_analysis.adapter_io",
    "train": "dora_analysis.training",
    "TrainConfig": "dora_analysis.training",
    "DoraAnalysisError": "dora_analysis.errors",
    "InputError": "dora_analysis.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dora_analysis' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
