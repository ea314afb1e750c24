"""The package's shape: the data's path reads from the tree, and each layer imports only what it may.

Every import in every module is checked, including those inside functions (the lazy ones), so a
rule cannot be dodged by importing late.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dora_analysis"

SUBPACKAGES = {"readers", "analysis", "adapters", "training", "tracking", "views", "commands"}
# Foundations every layer may use: the error type, atomic writes, the frame's shared names.
FOUNDATIONS = {"errors", "atomic", "schema", "devices"}
# The pure math of the analysis: tensors and frames in, numbers out; no files, no readers.
MATH = {"decomposition", "fused_rows", "row_blocks", "low_rank", "correlation", "spectrum", "conventions"}

# For each layer, the parts of the package it must never import.
FORBIDDEN = {
    "readers": {"analysis", "views", "commands", "training", "adapters", "tracking"},
    "analysis": {"views", "commands", "training", "adapters", "tracking"},
    "adapters": {"analysis", "views", "commands", "training", "tracking"},
    "training": {"analysis", "views", "commands", "tracking"},
    # the live model read as checkpoints: readers, analysis and the adapter layers, nothing above
    "tracking": {"views", "commands", "training"},
    "views": {"readers", "analysis", "adapters", "training", "commands", "tracking"},
    "foundations": SUBPACKAGES,
}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _imported(path: Path) -> set[str]:
    """The ``dora_analysis.*`` modules ``path`` imports, as dotted names below the package."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; use dora_analysis.<layer>.<module>")
    return {n.removeprefix("dora_analysis.") for n in names if n.startswith("dora_analysis.")}


def _layer(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    if len(parts) > 1:
        return parts[0]
    return "foundations" if path.stem in FOUNDATIONS else "top"


def test_the_tree_has_the_layers_and_nothing_loose():
    top = {p.stem for p in PACKAGE.glob("*.py")}
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == SUBPACKAGES
    assert top == {"__init__", "__main__"} | FOUNDATIONS


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_layer_imports_only_what_it_may(path: Path):
    layer = _layer(path)
    reached = {name.split(".")[0] for name in _imported(path)}
    forbidden = FORBIDDEN.get(layer, set()) & reached
    assert not forbidden, f"{path.relative_to(PACKAGE)} ({layer}) imports {sorted(forbidden)}"


@pytest.mark.parametrize("name", sorted(MATH))
def test_the_math_knows_nothing_of_files_or_readers(name: str):
    reached = _imported(PACKAGE / "analysis" / f"{name}.py")
    outside = {n for n in reached if n.split(".")[0] not in ("analysis", "schema")}
    assert not outside, f"analysis/{name}.py imports {sorted(outside)}"
    assert not any(n.startswith(("analysis.comparison", "analysis.series")) for n in reached)


def test_the_public_api_is_reexported_and_importable():
    import dora_analysis

    for name in dora_analysis.__all__:
        assert getattr(dora_analysis, name) is not None, name


def test_notebooks_and_readme_use_only_the_public_api():
    import json
    import re

    root = PACKAGE.parent
    texts = [(root / "README.md").read_text(encoding="utf-8")]
    for notebook in sorted((root / "notebooks").glob("*.ipynb")):
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        texts += ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    deep = [m for t in texts for m in re.findall(r"dora_analysis\.[a-z_]+\.[a-z_]+", t)]
    deep += [m for t in texts for m in re.findall(r"from dora_analysis\.[a-z_.]+ import", t)]
    assert not deep, f"reaches past the public API: {deep}"
