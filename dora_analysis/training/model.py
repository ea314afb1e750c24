"""The model to train: the pre-trained encoder with a seeded head, and the adapters for LoRA/DoRA."""

from __future__ import annotations

from pathlib import Path

import torch

from dora_analysis.training.config import HEAD_MODULES, TrainConfig

__all__ = ["load_model", "weights_prefix", "adapt"]


def load_model(model_path: Path, num_labels: int, seed: int) -> torch.nn.Module:
    """A sequence classifier on the pre-trained encoder, with a new head seeded by ``seed``."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    previous, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the "newly initialised classifier" report is expected here
    hf_logging.disable_progress_bar()  # our own bar is the only one
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=num_labels, local_files_only=True, dtype=torch.float32
        )
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()
    # The head's initial values must not depend on how transformers draws them: own generator.
    generator = torch.Generator().manual_seed(seed)
    std = float(getattr(model.config, "initializer_range", 0.02))
    with torch.no_grad():
        for head in HEAD_MODULES:
            for module in getattr(model, head).modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                    if module.bias is not None:
                        module.bias.zero_()
    return model


def weights_prefix(model: torch.nn.Module) -> str:
    """The component the classifier puts in front of the encoder's names (``bert.`` for BERT)."""
    prefix = getattr(model, "base_model_prefix", "")
    return f"{prefix}." if prefix and hasattr(model, prefix) else ""


def adapt(model: torch.nn.Module, config: TrainConfig) -> list[str]:
    """Wrap the target Linears (LoRA/DoRA); FT trains everything. Returns the adapted module names."""
    if config.method == "ft":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return []
    from dora_analysis.adapters.inject import inject_adapters

    # magnitude_only: the layer's own magnitude-only mode (paper Table 6: m alone, no A/B), saved as
    # a DoRA adapter whose update is an exact zero rank-1 product
    adapted = inject_adapters(
        model,
        method="magnitude" if config.magnitude_only else config.method,
        targets=tuple(config.targets),
        r=config.rank,
        alpha=config.alpha,
        dropout=config.dropout,
        rslora=config.rslora,
        modules_to_save=HEAD_MODULES,
        detach_norm=config.detach_norm,
    )
    return adapted
