"""PyTorch pickles (readers/torch_pickle.py): containers unwrapped, payloads never run, and zip-format
files whose small records torch trusts unchecked: refused before torch reads them.

A ``byteorder`` of ``big`` made ``torch.load(map_location="meta")`` byte-swap a meta storage and end
the process with SIGSEGV; a ``.storage_alignment`` of 0 divided by zero (SIGFPE). Those two run in
a subprocess (a regression must fail the test, not kill the test run); the others in process.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from reader_checks import assert_same, read_all
from tiny_models import file_digests

from dora_analysis.errors import InputError
from dora_analysis.readers import open_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _saved(folder: Path) -> Path:
    path = folder / "saved.pt"
    torch.save({"w": torch.randn(4, 3), "b": torch.randn(3, dtype=torch.bfloat16)}, path)
    return path


def _with_record(source: Path, target: Path, record: str, data: bytes | None) -> Path:
    """A copy of the zip ``source`` with ``record`` (below the archive's folder) holding ``data``."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            body = zin.read(info.filename)
            if info.filename.split("/", 1)[1] == record:
                if data is None:
                    continue
                body = data
            zout.writestr(info.filename, body)
    return target


@pytest.mark.slow  # a fresh interpreter per case (about 8 s on 2 busy cores)
@pytest.mark.parametrize(
    ("record", "data", "says"),
    [("byteorder", b"big", "big-endian"), (".storage_alignment", b"0", "from 1 to")],
    ids=["byteorder-big-was-SIGSEGV", "alignment-0-was-SIGFPE"],
)
def test_records_that_crashed_torch_end_in_one_line_and_exit_2(
    tmp_path: Path, record: str, data: bytes, says: str
) -> None:
    crafted = _with_record(_saved(tmp_path), tmp_path / "crafted.pt", record, data)
    run = subprocess.run(
        [sys.executable, "-m", "dora_analysis", "compare", str(crafted), str(crafted)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = (run.stdout + run.stderr).strip().splitlines()
    assert run.returncode == 2, (run.returncode, lines[-3:])
    assert len(lines) == 1 and says in lines[0] and str(crafted) in lines[0], lines
    assert len(lines[0]) <= 300


@pytest.mark.parametrize(
    ("record", "data", "says"),
    [
        ("byteorder", b"\xff\xfe", "expected 'little'"),
        ("byteorder", b"", "expected 'little'"),
        ("byteorder", b"LITTLE", "expected 'little'"),
        ("byteorder", b"big" * 100_000, "300000 bytes"),
        (".storage_alignment", b"-64", "from 1 to"),
        (".storage_alignment", b"9" * 20, "from 1 to"),
        (".storage_alignment", b"x", "from 1 to"),
        (".format_version", b"zz", "from 0 to"),
        ("version", b"-1", "from 0 to"),
    ],
)
def test_small_records_torch_trusts_are_checked_first(tmp_path: Path, record: str, data: bytes, says: str):
    crafted = _with_record(_saved(tmp_path), tmp_path / "crafted.pt", record, data)
    with pytest.raises(InputError) as caught:
        open_checkpoint(crafted)
    message = str(caught.value)
    assert says in message and record in message and len(message) <= 300, message


def test_a_little_endian_file_without_a_byteorder_record_still_reads(tmp_path: Path) -> None:
    saved = _saved(tmp_path)
    reference = torch.load(saved, weights_only=True)
    older = tmp_path / "older.pt"
    torch.save(reference, older, _disable_byteorder_record=True)
    with open_checkpoint(older) as reader:
        for name, tensor in reference.items():
            assert torch.equal(reader.get(name), tensor)


@pytest.mark.parametrize("record", ["data.pkl", "data/0"])
def test_a_missing_record_is_one_short_line_with_our_text_first(tmp_path: Path, record: str) -> None:
    crafted = _with_record(_saved(tmp_path), tmp_path / "crafted.pt", record, None)
    with pytest.raises(InputError) as caught:
        open_checkpoint(crafted)
    message = str(caught.value)
    assert message.startswith(f"{crafted}: not a readable PyTorch file (") and len(message) <= 300, message


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
