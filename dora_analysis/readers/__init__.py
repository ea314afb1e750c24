"""Checkpoint readers: :func:`open_checkpoint` detects the format and returns a :class:`CheckpointReader`.

Formats: a ``.safetensors`` file; a Hugging Face model folder (``model.safetensors``, shards with
``model.safetensors.index.json``, ``pytorch_model.bin`` or its shards); PyTorch pickles
(``.bin``/``.pt``/``.pth``, ``weights_only=True`` only); a PEFT LoRA/DoRA adapter folder merged over a
base; the NVlabs DoRA layout (``weight_m_wdecomp``); a Trainer ``checkpoint-<step>`` folder holding
any of these (its optimizer/scheduler/RNG files are never read).
"""

from dora_analysis.readers.base import CheckpointReader, LowRankUpdate
from dora_analysis.readers.checkpoint import open_checkpoint
from dora_analysis.readers.folder import FoundWeights, find_weights
from dora_analysis.readers.hub import adapter_base, resolve_model
from dora_analysis.readers.trainer import find_checkpoints

__all__ = [
    "CheckpointReader",
    "LowRankUpdate",
    "FoundWeights",
    "find_weights",
    "open_checkpoint",
    "find_checkpoints",
    "adapter_base",
    "resolve_model",
]
