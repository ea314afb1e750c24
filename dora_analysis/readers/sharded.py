"""A Hugging Face model folder split into shards, listed by ``*.index.json``; one shard open at a time.

The index lists tensors alphabetically (``layers.10`` before ``layers.2``), which jumps between shards;
:meth:`ShardedReader.read_order` gives the order that follows the files (shard by shard, and by
offset inside a safetensors shard), so each shard is opened once.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dora_analysis.errors import InputError
from dora_analysis.readers._common import ReaderMixin
from dora_analysis.readers.base import StoredTensor
from dora_analysis.readers.files import open_weight_file
from dora_analysis.readers.json_file import read_json
from dora_analysis.readers.safetensors_file import SafetensorsReader, read_safetensors_header
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

    def read_order(self, names: list[str]) -> list[str]:
        """``names`` in file order: by shard, then by position in the shard (a safetensors header's
        offsets; a pickle shard's index order). Names this checkpoint lacks go last, as given."""
        shards = sorted(set(self._shard_of.values()))
        rank = {shard: i for i, shard in enumerate(shards)}
        index_position = {name: i for i, name in enumerate(self._shard_of)}
        in_shard: dict[Path, dict[str, int]] = {}
        for shard in {self._shard_of[n] for n in names if n in self._shard_of}:
            if shard.suffix == ".safetensors":
                header = read_safetensors_header(shard)  # validated; header only, no tensor data
                for n, entry in header.items():
                    self._meta.setdefault(n, (entry.shape, entry.dtype))
                in_shard[shard] = {n: entry.offset for n, entry in header.items()}
        last = len(shards)

        def key(name: str) -> tuple[int, int]:
            shard = self._shard_of.get(name)
            if shard is None:
                return (last, 0)
            return (rank[shard], in_shard.get(shard, {}).get(name, index_position[name]))

        return sorted(names, key=key)

    def _meta_of(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        if name not in self._meta:
            path = self._shard_of.get(name)
            if path is not None and path.suffix == ".safetensors":
                # the header alone: asking shapes in index order must not open shards out of turn
                for n, entry in read_safetensors_header(path).items():
                    self._meta.setdefault(n, (entry.shape, entry.dtype))
            if name not in self._meta:
                self._shard(name)
        return self._meta[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta_of(name)[0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta_of(name)[1]

    def get(self, name: str) -> torch.Tensor:
        return self._shard(name).get(name)

    def stored_at(self, name: str) -> StoredTensor | None:
        """The shard's own answer (its map stays alive with the record when the next shard opens)."""
        return self._shard(name).stored_at(name)

    def close(self) -> None:
        if self._open is not None:
            self._open.close()
        self._open, self._open_path, self._open_names = None, None, set()
