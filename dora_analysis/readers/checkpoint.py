"""Opening a checkpoint: :func:`open_checkpoint` detects the format and returns a :class:`CheckpointReader`.

The folder's weights are found by :func:`~dora_analysis.readers.folder.find_weights`; an adapter is
merged over the base it names or the base passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dora_analysis.errors import InputError
from dora_analysis.readers.adapter_config import read_adapter_config
from dora_analysis.readers.base import CheckpointReader
from dora_analysis.readers.files import open_weight_file
from dora_analysis.readers.folder import FoundWeights, find_weights
from dora_analysis.readers.hub import cached_model, resolve_model
from dora_analysis.readers.nvlabs_dora import has_nvlabs_keys, open_nvlabs_dora
from dora_analysis.readers.peft_adapter import (
    ADAPTER_FILES,
    adapter_weights_file,
    open_peft_adapter,
    refuse_base_rewriting,
)
from dora_analysis.readers.sharded import ShardedReader

__all__ = ["open_checkpoint"]


def open_checkpoint(
    path: Path | str,
    base: Path | str | CheckpointReader | None = None,
    *,
    lora_alpha: float | None = None,
) -> CheckpointReader:
    """Open the checkpoint at ``path`` as a :class:`CheckpointReader` (use it as a context manager).

    Args:
        path: a weights file, a model folder, a Trainer ``checkpoint-<step>`` folder, an adapter, or
            a Hugging Face model id in the local cache (offline, see :mod:`dora_analysis.readers.hub`).
        base: the pre-trained checkpoint an adapter is merged over (a path, a cached model id, or an
            open reader that the caller keeps owning). For a PEFT adapter, None means
            ``adapter_config.json``'s ``base_model_name_or_path`` when that is a local path or a
            cached model id.
        lora_alpha: the LoRA alpha of an NVlabs DoRA state dict (it is not stored in the weights);
            overrides an ``adapter_config.json`` beside the file. Ignored for other formats.

    Raises:
        InputError: one line naming the file (and tensor) and the problem.
    """
    return _open_path(path, base, lora_alpha, as_base=False)


def _open_path(
    path: Path | str, base: Path | str | CheckpointReader | None, lora_alpha: float | None, *, as_base: bool
) -> CheckpointReader:
    """:func:`open_checkpoint`; ``as_base``: ``path`` is an adapter's base, so it may not be an adapter
    itself (refused before anything is opened: an adapter naming itself, or another adapter that names
    it back, as its ``base_model_name_or_path`` would otherwise recurse without end)."""
    path = resolve_model(path)  # a path, or a model id in the local Hugging Face cache
    if path.is_dir():
        found = find_weights(path)
    elif path.name.endswith(".index.json"):
        found = FoundWeights("sharded", path)
    else:
        found = FoundWeights("file", path)
    if found.kind == "sharded":
        return ShardedReader(found.path)
    if found.kind == "adapter":
        if as_base:
            raise _adapter_as_base(found.path)
        return _open_adapter(found.path, base, lora_alpha)
    return _open_file(found.path, base, lora_alpha, as_base=as_base)


def _adapter_as_base(path: Path) -> InputError:
    return InputError.of(path, "the base checkpoint is itself an adapter; pass the full pre-trained weights")


def _open_adapter(
    folder: Path, base: Path | str | CheckpointReader | None, lora_alpha: float | None
) -> CheckpointReader:
    config = read_adapter_config(folder / "adapter_config.json", require_rank=False)
    if config.peft_type == "DORA":  # the NVlabs PEFT fork's own adapter type
        factors = open_weight_file(adapter_weights_file(folder))
        try:
            base_reader, owned = _resolve_base(base, config.base_model_name_or_path, folder, required=False)
        except BaseException:
            factors.close()
            raise
        return _closing_on_error(
            owned, lambda: open_nvlabs_dora(factors, base_reader, lora_alpha=lora_alpha, owned=owned)
        )
    # r and lora_alpha are required, and the init must leave the base alone: fail before opening the base
    refuse_base_rewriting(read_adapter_config(folder / "adapter_config.json"))
    base_reader, owned = _resolve_base(base, config.base_model_name_or_path, folder, required=True)
    assert base_reader is not None
    return _closing_on_error(owned, lambda: open_peft_adapter(folder, base_reader, owned=owned))


def _closing_on_error(
    owned: list[CheckpointReader], make: Callable[[], CheckpointReader]
) -> CheckpointReader:
    """``make()``, closing the ``owned`` readers if it fails (on success the new reader owns them)."""
    try:
        return make()
    except BaseException:
        for reader in owned:
            reader.close()
        raise


def _open_file(
    path: Path, base: Path | str | CheckpointReader | None, lora_alpha: float | None, *, as_base: bool = False
) -> CheckpointReader:
    reader = open_weight_file(path)
    names = reader.names()
    joined = "\n".join(names) + "\n"  # a C-speed scan first: a name's hit is one here too
    has_lora = (".lora_A." in joined or ".lora_magnitude_vector\n" in joined) and any(
        ".lora_A." in n or n.endswith(".lora_magnitude_vector") for n in names
    )
    if as_base and (has_lora or has_nvlabs_keys(names)):
        reader.close()  # an NVlabs file with its own W0 would do, but a base is meant to be plain weights
        raise _adapter_as_base(path)
    if has_nvlabs_keys(names) or (has_lora and lora_alpha is not None and path.name not in ADAPTER_FILES):
        try:
            base_reader, owned = _resolve_base(base, None, path, required=False)
        except BaseException:
            reader.close()
            raise
        return _closing_on_error(
            owned, lambda: open_nvlabs_dora(reader, base_reader, lora_alpha=lora_alpha, owned=owned)
        )
    if has_lora:
        reader.close()
        if path.name in ADAPTER_FILES and (path.parent / "adapter_config.json").is_file():
            return _open_adapter(path.parent, base, lora_alpha)
        raise InputError.of(
            path,
            "holds LoRA factors but no adapter_config.json beside it gives r and lora_alpha (pass lora_alpha for a plain state dict)",
        )
    return reader


def _resolve_base(
    base: Path | str | CheckpointReader | None, hint: str | None, adapter: Path, *, required: bool
) -> tuple[CheckpointReader | None, list[CheckpointReader]]:
    """The base reader and the readers opened here (closed with the adapter reader)."""
    if base is not None and not isinstance(base, (str, Path)):
        return base, []
    if base is None:
        if hint and (Path(hint).exists() or cached_model(hint) is not None):
            base = hint
        elif required:
            raise InputError.of(
                adapter,
                f"an adapter needs a base checkpoint: pass base (adapter_config.json's base_model_name_or_path {hint!r} is neither a local path nor in the local Hugging Face cache)",
            )
        else:
            return None, []
    reader = _open_path(Path(base), None, None, as_base=True)
    if reader.partial:
        reader.close()
        raise InputError.of(
            base, "the base checkpoint is itself an adapter; pass the full pre-trained weights"
        )
    return reader, [reader]
