"""Models where users keep them: a Hugging Face model id in the local cache, resolved offline.

Nothing is downloaded: ``huggingface_hub.snapshot_download(..., local_files_only=True)`` answers from
the cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``, read when
called) or fails.
"""

from __future__ import annotations

import os
from pathlib import Path

from dora_analysis.errors import InputError
from dora_analysis.readers.adapter_config import read_adapter_config

__all__ = ["hub_cache_dir", "cached_model", "resolve_model", "adapter_base"]


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache as the environment says now (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_model(repo_id: str, revision: str | None = None) -> Path | None:
    """The local snapshot folder of model ``repo_id`` in the hub cache, or None (not cached, or not a
    valid model id). Offline: never downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    try:
        folder = snapshot_download(
            repo_id, revision=revision, cache_dir=hub_cache_dir(), local_files_only=True
        )
    except Exception:  # LocalEntryNotFoundError and kin: not in the cache
        return None
    return Path(folder)


def resolve_model(spec: str | os.PathLike) -> Path:
    """``spec`` as a local path: the path itself when it exists, else a cached model id's snapshot.

    Raises:
        InputError: neither an existing path nor a model id in the local Hugging Face cache.
    """
    path = Path(spec)
    if path.exists():
        return path
    found = cached_model(str(spec))
    if found is None:
        raise InputError.of(
            spec,
            f"no such file or folder, nor a model id in the local Hugging Face cache ({hub_cache_dir()})",
        )
    return found


def adapter_base(path: Path) -> str | None:
    """The base a PEFT adapter names (``adapter_config.json``'s ``base_model_name_or_path``), for the
    adapter folder ``path`` (or its weights file, or a Trainer checkpoint holding one); None if
    ``path`` is not an adapter or names no base.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    config = folder / "adapter_config.json"
    if not config.is_file():
        return None
    base = read_adapter_config(config, require_rank=False).base_model_name_or_path
    return base or None
