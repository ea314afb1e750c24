"""`python -m dora_analysis`: the module entry point and its exit status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_module_entry_point_exit_status(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dora_analysis", "compare", str(tmp_path / "a"), str(tmp_path / "b")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "no such file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
