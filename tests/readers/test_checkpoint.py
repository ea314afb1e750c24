"""open_checkpoint (readers/checkpoint.py): missing or unknown inputs named."""

from __future__ import annotations

from pathlib import Path

import pytest
from reader_checks import write_training_state
from tiny_models import file_digests

from dora_analysis.errors import InputError
from dora_analysis.readers import open_checkpoint


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
