"""Sharded Hugging Face folders (readers/sharded.py): the same tensors as one file, one shard open at a time."""

from __future__ import annotations

from pathlib import Path

from reader_checks import (
    assert_same,
    read_all,
)
from tiny_models import save_bin_folder, save_tiny_bert

from dora_analysis.readers import open_checkpoint
from dora_analysis.readers.safetensors_file import SafetensorsReader


def test_hf_folders_single_sharded_and_bin_read_identically(tmp_path: Path) -> None:
    state = save_tiny_bert(tmp_path / "single")
    save_tiny_bert(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    save_bin_folder(tmp_path / "bin", state)
    save_bin_folder(tmp_path / "bin_sharded", state, shards=3)
    want = read_all(tmp_path / "single")
    assert_same(want, state)
    for folder in ("sharded", "bin", "bin_sharded"):
        assert_same(read_all(tmp_path / folder), state)
    assert_same(read_all(tmp_path / "single" / "model.safetensors"), state)
    assert_same(read_all(tmp_path / "sharded" / "model.safetensors.index.json"), state)


def test_sharded_reader_keeps_one_shard_open(tmp_path: Path, monkeypatch) -> None:
    save_tiny_bert(tmp_path, max_shard_size="20KB")
    opened: list[Path] = []
    closed: list[Path] = []
    real_init, real_close = SafetensorsReader.__init__, SafetensorsReader.close

    def init(self, path):
        opened.append(Path(path))
        real_init(self, path)

    def close(self):
        closed.append(self.source)
        real_close(self)

    monkeypatch.setattr(SafetensorsReader, "__init__", init)
    monkeypatch.setattr(SafetensorsReader, "close", close)
    with open_checkpoint(tmp_path) as reader:
        for name in reader.names():
            reader.get(name)
            assert len(opened) - len(closed) <= 1
    assert len(set(opened)) > 1 and len(opened) == len(closed)
