"""dora_analysis: the magnitude/direction weight-decomposition analysis of the DoRA paper.

The package follows the data: ``readers`` (checkpoints, one tensor at a time) -> ``analysis`` (the
row math, compare, series, correlations) -> ``views`` (figures, report, tables), with ``adapters``
(the LoRA/DoRA layers and PEFT's format) and ``training`` producing checkpoints beside them, then
``jobs`` (the demo and the study, library code) and ``commands`` (the CLI, calling them) on top.
Everything a user needs is re-exported here, imported lazily so that ``python -m dora_analysis``
starts fast:

- analysis: :func:`compare`, :func:`compare_many`, :func:`analyze_series`, :func:`correlations`
- coupling apart from shared growth: :func:`increments`, :func:`relative_to_base`,
  :func:`row_coupling` (row by row, from ``analyze_series(..., per_row=True)``), :func:`row_coupling_summary`
- runs on disk: :func:`run_checkpoints`, :func:`training_history`
- math: :func:`magnitude`, :func:`tensor_delta`
- reading: :func:`open_checkpoint`
- views: :func:`direction_magnitude_figure`, :func:`final_layers_figure`,
  :func:`training_curves_figure`, :func:`write_figures`, :func:`render_report`, :func:`write_frame`
- the layer: :class:`LoRALinear`, :class:`DoRALinear`, :func:`inject_adapters`, :func:`merge_adapters`,
  :func:`init_adapter_parameters` (after a meta-device model got its weights),
  :func:`save_adapter`, :func:`load_adapter`
- training: :class:`TrainConfig`, :func:`train`, :func:`load_trained_model`, :func:`default_model_path`
- the demo: :class:`DemoConfig`, :func:`run_demo`
- while training: :class:`DecompositionTracker` (any loop), :class:`DecompositionCallback`
  (``transformers.Trainer``), :func:`read_tracked` (their ``deltas.csv``), :func:`trajectories_figure`
- the update's shape (``metrics="spectrum,intruders"``): :class:`SpectrumOptions`,
  :func:`spectrum_layers_figure`, :func:`intruders_figure`, :func:`subspace_figure`,
  :func:`write_spectrum_figures`, :func:`spectrum_table`
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "compare": "dora_analysis.analysis.comparison",
    "compare_many": "dora_analysis.analysis.comparison",
    "analyze_series": "dora_analysis.analysis.series",
    "Cluster": "dora_analysis.analysis.cluster",
    "correlations": "dora_analysis.analysis.correlation",
    "increments": "dora_analysis.analysis.coupling",
    "relative_to_base": "dora_analysis.analysis.coupling",
    "row_coupling": "dora_analysis.analysis.coupling",
    "row_coupling_summary": "dora_analysis.analysis.coupling",
    "magnitude": "dora_analysis.analysis.decomposition",
    "tensor_delta": "dora_analysis.analysis.decomposition",
    "open_checkpoint": "dora_analysis.readers",
    "LoRALinear": "dora_analysis.adapters.lora",
    "DoRALinear": "dora_analysis.adapters.dora",
    "inject_adapters": "dora_analysis.adapters.inject",
    "merge_adapters": "dora_analysis.adapters.inject",
    "init_adapter_parameters": "dora_analysis.adapters.inject",
    "save_adapter": "dora_analysis.adapters.peft_format",
    "load_adapter": "dora_analysis.adapters.peft_format",
    "train": "dora_analysis.training",
    "TrainConfig": "dora_analysis.training",
    "run_checkpoints": "dora_analysis.readers.runs",
    "training_history": "dora_analysis.readers.runs",
    "direction_magnitude_figure": "dora_analysis.views.figures",
    "final_layers_figure": "dora_analysis.views.figures",
    "training_curves_figure": "dora_analysis.views.figures",
    "write_figures": "dora_analysis.views.figures",
    "render_report": "dora_analysis.views.report",
    "write_frame": "dora_analysis.views.tables",
    "load_trained_model": "dora_analysis.training",
    "default_model_path": "dora_analysis.training",
    "DemoConfig": "dora_analysis.jobs.demo",
    "run_demo": "dora_analysis.jobs.demo",
    "SpectrumOptions": "dora_analysis.analysis.spectrum",
    "spectrum_layers_figure": "dora_analysis.views.spectrum_figures",
    "intruders_figure": "dora_analysis.views.spectrum_figures",
    "subspace_figure": "dora_analysis.views.spectrum_figures",
    "write_spectrum_figures": "dora_analysis.views.spectrum_figures",
    "spectrum_table": "dora_analysis.views.spectrum_report",
    "DoraAnalysisError": "dora_analysis.errors",
    "InputError": "dora_analysis.errors",
    "LayoutWarning": "dora_analysis.analysis.planning",
    "sort_rows": "dora_analysis.schema",
    "split_name": "dora_analysis.readers.names",
    "model_layout": "dora_analysis.readers.layout",
    "resolve_model": "dora_analysis.readers",
    "DecompositionTracker": "dora_analysis.tracking.tracker",
    "DecompositionCallback": "dora_analysis.tracking.callback",
    "read_tracked": "dora_analysis.tracking.output",
    "DeltasRecorder": "dora_analysis.tracking.recorder",
    "trajectories_figure": "dora_analysis.views.trajectories",
    "write_trajectories": "dora_analysis.views.trajectories",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dora_analysis' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
