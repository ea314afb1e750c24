"""A Hugging Face hub cache laid out on disk (nothing downloaded), for tests of bases named by model id."""

from __future__ import annotations

from pathlib import Path

MODEL_ID = "tiny-org/tiny-bert"


def fake_hub(root: Path) -> tuple[Path, Path]:
    """A hub cache laid out as huggingface_hub lays it out; returns (cache dir, snapshot folder)."""
    cache = root / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--tiny-org--tiny-bert"
    snapshot = repo / "snapshots" / revision
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return cache, snapshot
