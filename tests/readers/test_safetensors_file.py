"""One .safetensors file (readers/safetensors_file.py): a bad header is one line naming the file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import file_digests

from dora_analysis.errors import InputError
from dora_analysis.readers import open_checkpoint
from dora_analysis.readers.safetensors_file import SafetensorsReader


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
    elif case == "boolean_shape":  # JSON's true is an int to isinstance; never a size
        header = json.loads(good[8 : 8 + n])
        header["b.weight"]["shape"] = [True, 32]
        path.write_bytes(_with_header(header, good[8 + n :]))
    elif case == "utf16_long_integer":  # the digit bound holds in every encoding JSON allows
        text = '{"a.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, ' + "9" * 40 + "]}}"
        raw = text.encode("utf-16")
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + good[8 + n :])
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
        ("boolean_shape", "non-negative integers"),
        ("utf16_long_integer", "40 digits"),
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


def _assert_same_as_safe_open(path: Path) -> None:
    reader = SafetensorsReader(path)
    with safe_open(str(path), framework="pt") as reference:
        for name in reference.keys():  # noqa: SIM118 - safe_open has no __iter__
            got, want = reader.get(name), reference.get_tensor(name)
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert torch.equal(got, want), name
            assert got.is_contiguous(), name


def test_views_equal_safe_open_for_every_dtype_and_shape(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=g).bfloat16(),
        "b": torch.tensor(3.5, dtype=torch.float64),
        "c": torch.arange(7, dtype=torch.int8),
        "d": torch.randn(2, 3, 4, generator=g),
        "e": torch.zeros(0, 4, dtype=torch.float16),
        "f": torch.tensor([True, False]),
        "g": torch.randn(1, generator=g).half(),
    }
    save_file(tensors, tmp_path / "x.safetensors")
    _assert_same_as_safe_open(tmp_path / "x.safetensors")


def test_unaligned_offsets_and_writes_never_reach_the_file(tmp_path: Path) -> None:
    # an F32 tensor 2 bytes into the data: not a whole float32 from the map's start
    header = {
        "h": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]},
        "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [2, 18]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    data = np.array([0x3F80], dtype="<u2").tobytes() + np.arange(4, dtype="<f4").tobytes()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    before = path.read_bytes()
    _assert_same_as_safe_open(path)
    reader = SafetensorsReader(path)
    assert torch.equal(reader.get("w"), torch.arange(4.0).reshape(2, 2))
    reader.get("h").fill_(7.0)  # a private mapping: the caller's write stays in memory
    assert path.read_bytes() == before


def _record_variants() -> list[object]:
    """Well-formed records and every way one field can be off (the fast check must defer them all)."""
    good = {"dtype": "BF16", "shape": [3, 4], "data_offsets": [8, 32]}
    variants: list[object] = [good, {**good, "shape": []}, None, [1, 2], {}, {**good, "extra": 1}]
    for key, values in {
        "dtype": ["F8_E4M3", "F8_E5M2", "bf16", "Q4", 5, None, ["BF16"]],
        "shape": [[3, 0], [0, 4], [3, -4], [3, 4.0], [3, True], [12], [4, 3], [3, 5], "3x4", None, [[3], 4]],
        "data_offsets": [
            [8, 31],
            [8],
            [8, 32, 40],
            [32, 8],
            [-8, 16],
            [8, 10**6],
            [8.0, 32],
            [False, 24],
            {"a": 8, "b": 32},
            (8, 32),
            None,
        ],
    }.items():
        variants += [{**good, key: value} for value in values]
        variants.append({k: v for k, v in good.items() if k != key})
    variants += [
        {"dtype": code, "shape": [2, 2], "data_offsets": [0, 4 * size]}
        for code, size in (("F32", 4), ("F16", 2), ("BOOL", 1), ("I64", 8), ("F64", 8), ("U8", 1))
    ]
    return variants


@pytest.mark.parametrize("info", _record_variants(), ids=repr)
def test_the_fast_record_check_accepts_only_what_the_full_check_accepts(info: object) -> None:
    from dora_analysis.readers.safetensors_file import _entry, _plain_entry

    fast = _plain_entry(info, data_bytes=1000)
    try:
        full = _entry(Path("m.safetensors"), "t", info, data_bytes=1000)
    except InputError:
        assert fast is None
    else:
        assert fast is None or fast == full


def test_the_fast_record_check_takes_the_common_records() -> None:
    from dora_analysis.readers.safetensors_file import TensorEntry, _plain_entry

    info = {"dtype": "BF16", "shape": [3, 4], "data_offsets": [8, 32]}
    assert _plain_entry(info, data_bytes=32) == TensorEntry(torch.bfloat16, (3, 4), 8)
    assert _plain_entry(info, data_bytes=31) is None  # past the end: the full check explains
