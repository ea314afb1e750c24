"""ΔM and ΔD while a model trains: :class:`~dora_analysis.tracking.tracker.DecompositionTracker` for
any loop, :class:`~dora_analysis.tracking.callback.DecompositionCallback` for ``transformers.Trainer``."""
