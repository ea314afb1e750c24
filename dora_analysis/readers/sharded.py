"""A Hugging Face model folder split into shards, listed by ``*.index.json``; one shard open at a time."""

from __future__ import annotations

from pathlib import Path

import torch

from dora_analysis.errors import InputError
from dora_analysis.readers._common import ReaderMixin
from dora_analysis.readers.files import open_weight_file
from dora_analysis.readers.json_file import read_json
from dora_analysis.readers.safetensors_file import SafetensorsReader
from dora_analysis.readers.torch_pickle import TorchPickleReader

__all__ = ["read_weight_map", "ShardedReader"]


def read_weight_map(index_file: Path) -> dict[str, Path]:
    """``{tensor name: shard path}`` from a ``model.safetensors.index.json`` / ``pytorch_model.bin.index.json``."""
    index = read_json(index_file, "shard index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError.of(index_file, "shard index has no 'weight_map' of tensor name -> shard file")
    folder = index_file.parent
    shards: dict[str, Path] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard.startswith("."):
            raise InputError.of(index_file, f"shard index names an invalid shard file {shard!r}", tensor=name)
        shards[name] = folder / shard
    for shard in sorted(set(shards.values())):
        if not shard.is_file():
            raise InputError.of(index_file, f"shard file {shard.name} listed in the index is missing")
    return shards


class ShardedReader(ReaderMixin):
    """Tensors spread over shard files; only the shard of the last requested tensor stays open.

    Shapes and dtypes come from the shard headers (safetensors) or the memory-mapped pickle, opened
    lazily in turn.
    """

    partial = False

    def __init__(self, index_file: Path) -> None:
        self.source = Path(index_file).parent
        self._index_file = Path(index_file)
        self._shard_of = read_weight_map(self._index_file)
        self._open_path: Path | None = None
        self._open: SafetensorsReader | TorchPickleReader | None = None
        self._open_names: set[str] = set()
        # shape/dtype of every tensor of every shard opened so far (cheap, avoids reopening shards)
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}

    def _shard(self, name: str) -> SafetensorsReader | TorchPickleReader:
        try:
            path = self._shard_of[name]
        except KeyError:
            raise KeyError(f"{self.source}: no tensor {name!r}") from None
        if path != self._open_path:
            self.close()
            self._open = open_weight_file(path)
            self._open_path = path
            self._open_names = set(self._open.names())
            for n in self._open_names:
                self._meta[n] = (self._open.shape(n), self._open.dtype(n))
        assert self._open is not None
        if name not in self._open_names:
            raise InputError.of(
                path,
                f"the shard index {self._index_file.name} lists this tensor but the shard lacks it",
                tensor=name,
            )
        return self._open

    def names(self) -> list[str]:
        return list(self._shard_of)

    def _meta_of(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        if name not in self._meta:
            self._shard(name)
        return self._meta[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta_of(name)[0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta_of(name)[1]

    def get(self, name: str) -> torch.Tensor:
        return self._shard(name).get(name)

    def close(self) -> None:
        if self._open is not None:
            self._open.close()
        self._open, self._open_path, self._open_names = None, None, set()
