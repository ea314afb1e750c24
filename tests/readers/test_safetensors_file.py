"""One .safetensors file (readers/safetensors_file.py): a bad header is one line naming the file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import file_digests

from dora_analysis.errors import InputError
from dora_analysis.readers import open_checkpoint


def _safetensors_bytes(tmp_path: Path) -> bytes:
    save_file({"a.weight": torch.randn(4, 4), "b.weight": torch.randn(2, 4)}, tmp_path / "good.safetensors")
    return (tmp_path / "good.safetensors").read_bytes()


def _with_header(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _bad_file(tmp_path: Path, case: str) -> Path:
    good = _safetensors_bytes(tmp_path)
    n = struct.unpack("<Q", good[:8])[0]
    path = tmp_path / "bad.safetensors"
    if case == "truncated_data":
        path.write_bytes(good[:-10])
    elif case == "header_past_eof":
        path.write_bytes(struct.pack("<Q", n + 1000) + good[8:])
    elif case == "offsets_past_eof":
        header = json.loads(good[8 : 8 + n])
        header["b.weight"]["data_offsets"] = [64, 64 + 32 * 4]
        header["b.weight"]["shape"] = [32, 1]
        path.write_bytes(_with_header(header, good[8 + n :]))
    elif case == "header_not_json":
        path.write_bytes(struct.pack("<Q", 12) + b"{not json!!}" + b"\0" * 16)
    elif case == "absurd_header":
        path.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    elif case == "tiny":
        path.write_bytes(b"\x01\x02")
    return path


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("truncated_data", "truncated"),
        ("header_past_eof", "runs past the end"),
        ("offsets_past_eof", "past its end"),
        ("header_not_json", "not valid JSON"),
        ("absurd_header", "absurd size"),
        ("tiny", "truncated"),
    ],
)
def test_bad_safetensors_files(tmp_path: Path, case: str, needle: str) -> None:
    path = _bad_file(tmp_path, case)
    before = file_digests(path)
    with pytest.raises(InputError) as err:
        open_checkpoint(path)
    message = str(err.value)
    assert message.startswith(str(path)) and needle in message and "\n" not in message
    if case == "offsets_past_eof":
        assert "b.weight" in message
    assert file_digests(path) == before
