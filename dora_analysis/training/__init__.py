"""Training the checkpoints to analyse: FT, LoRA or DoRA on a real pre-trained encoder.

``config`` (what a run is) -> ``tasks``/``data`` (the sentences, as batches) -> ``model`` (encoder,
head, adapters) -> ``loop`` (the optimizer steps) -> ``checkpoints`` (Trainer-style folders).
Nothing here imports the analysis.
"""

from dora_analysis.training.checkpoints import load_trained_model
from dora_analysis.training.config import DEFAULT_LR, METHODS, TrainConfig, default_model_path
from dora_analysis.training.data import evaluate
from dora_analysis.training.loop import train

__all__ = [
    "DEFAULT_LR",
    "METHODS",
    "TrainConfig",
    "default_model_path",
    "evaluate",
    "load_trained_model",
    "train",
]
