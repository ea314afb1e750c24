"""Checks shared by the reader tests: read every tensor of a checkpoint, compare, add training files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dora_analysis.readers import open_checkpoint
from dora_analysis.readers.names import canonical_name

TRAINING_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin")


def read_all(path, **kwargs) -> dict[str, torch.Tensor]:
    with open_checkpoint(path, **kwargs) as reader:
        out = {}
        for name in reader.names():
            t = reader.get(name)
            assert tuple(t.shape) == reader.shape(name) and t.dtype == reader.dtype(name)
            out[name] = t.clone()
        return out


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def write_training_state(folder: Path, step: int) -> None:
    for name in TRAINING_FILES:
        torch.save({"state": {0: torch.ones(3)}, "param_groups": [{"lr": 0.1}]}, folder / name)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))


TARGETS = ["query", "value"]


def check_against_peft(
    reader, reference: dict[str, torch.Tensor], expect_targets: int, expect_copies: set[str]
) -> None:
    ref_by_canon = {canonical_name(k): v for k, v in reference.items()}
    names = reader.names()
    targets = [n for n in names if reader.low_rank(n) is not None]
    assert reader.partial and len(targets) == expect_targets
    assert {canonical_name(n) for n in names if reader.low_rank(n) is None} >= {
        canonical_name(c) for c in expect_copies
    }
    for name in names:
        got = reader.get(name)
        want = ref_by_canon[canonical_name(name)]
        assert got.shape == want.shape == reader.shape(name)
        torch.testing.assert_close(got, want.to(torch.float32), atol=1e-5, rtol=0)


class MemoryReader:
    """A CheckpointReader over a dict, counting get() calls."""

    def __init__(self, tensors: dict[str, torch.Tensor], source: str, partial: bool = False):
        self.tensors, self.source, self.partial = tensors, Path(source), partial
        self.reads: list[str] = []

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def get(self, name: str) -> torch.Tensor:
        self.reads.append(name)
        return self.tensors[name]

    def low_rank(self, name: str):
        return None

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        pass
