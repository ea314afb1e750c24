"""open_checkpoint (readers/__init__.py): pickles unwrapped and refused, missing or unknown inputs named.

The pickle tests belong to readers/torch_pickle.py (tests/readers/test_torch_pickle.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reader_checks import assert_same, read_all, write_training_state
from tiny_models import file_digests

from dora_analysis.errors import InputError
from dora_analysis.readers import open_checkpoint


def test_pickle_containers_and_prefixes_are_unwrapped(tmp_path: Path) -> None:
    state = {"layer.0.weight": torch.randn(3, 4), "layer.0.bias": torch.randn(3)}
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "ddp.pt")
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in state.items()}}, tmp_path / "compiled.pth")
    torch.save(state, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)  # cannot be mmapped
    for name in ("ddp.pt", "compiled.pth", "legacy.bin"):
        assert_same(read_all(tmp_path / name), state)


def test_malicious_pickle_is_refused_and_its_payload_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    evil = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2, 2), "trap": Payload()}, evil)
    before = file_digests(evil)
    with pytest.raises(InputError) as err:
        open_checkpoint(evil)
    message = str(err.value)
    assert str(evil) in message and "code execution" in message and "\n" not in message
    assert not marker.exists()
    assert file_digests(evil) == before


def test_missing_unknown_and_empty_inputs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "weights.npy").write_bytes(b"\x93NUMPY")
    with pytest.raises(InputError, match="unknown format"):
        open_checkpoint(tmp_path / "weights.npy")
    ckpt = tmp_path / "checkpoint-9"
    ckpt.mkdir()
    write_training_state(ckpt, 9)
    before = file_digests(ckpt)
    with pytest.raises(InputError) as err:
        open_checkpoint(ckpt)
    assert str(ckpt) in str(err.value) and "no weights" in str(err.value)
    assert file_digests(ckpt) == before
