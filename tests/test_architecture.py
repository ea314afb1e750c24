"""The package's shape: the data's path reads from the tree, and each layer imports only what it may.

Every import in every module is checked, including those inside functions (the lazy ones), so a
rule cannot be dodged by importing late.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dora_analysis"

SUBPACKAGES = {"readers", "analysis", "adapters", "training", "tracking", "views", "jobs", "commands"}
# Foundations every layer may use: the error type, atomic writes, the frame's shared names, the device
# check, the factors of a LoRA/DoRA update with their merge (pure tensor math), and the garbage
# collector's pauses.
FOUNDATIONS = {"errors", "atomic", "schema", "devices", "factors", "collector"}
# The pure math of the analysis: tensors and frames in, numbers out; no files, no readers.
MATH = {
    "decomposition",
    "fused_rows",
    "row_blocks",
    "low_rank",
    "correlation",
    "inference",
    "coupling",
    "spectrum",
    "conventions",
}

# For each layer, the parts of the package it must never import.
FORBIDDEN = {
    "readers": {"analysis", "views", "jobs", "commands", "training", "adapters", "tracking"},
    "analysis": {"views", "jobs", "commands", "training", "adapters", "tracking"},
    "adapters": {"analysis", "views", "jobs", "commands", "training", "tracking"},
    "training": {"analysis", "views", "jobs", "commands", "tracking"},
    # the live model read as checkpoints: readers, analysis and the adapter layers, nothing above
    "tracking": {"views", "jobs", "commands", "training"},
    "views": {"readers", "analysis", "adapters", "training", "jobs", "commands", "tracking"},
    "jobs": {"commands"},
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
    outside = {n for n in reached if n.split(".")[0] not in ("analysis", "schema", "factors")}
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


# --- Import cycles, private names, function length -------------------------------------------------
# Every import statement counts wherever it stands: at the top, inside a function (deferred) or under
# ``if TYPE_CHECKING:``. A deferred import only hides a cycle from the interpreter, not from a reader.

TOOLS = PACKAGE.parent / "tools"
MAX_LENGTH_EXCEPTIONS = 5  # the named exceptions to the 60-line rule must stay few


def _module_names() -> dict[str, Path]:
    """``dora_analysis.<...>`` dotted name -> file, packages by their ``__init__``."""
    names = {}
    for path in _modules():
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


MODULES = _module_names()


def _import_edges(path: Path) -> list[tuple[str, int, str | None]]:
    """``(module imported, line, name taken from it)`` for every package import in ``path``.

    ``from dora_analysis.a import b`` is an import of ``dora_analysis.a.b`` when that is a module, else
    of ``dora_analysis.a`` taking the name ``b``. A package's implicit ``__init__`` (run before any of its
    submodules) is not an edge: it would make every submodule its package's ``__init__`` imports a cycle.
    """
    edges = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            edges += [(a.name, node.lineno, None) for a in node.names if a.name in MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dora_analysis"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if submodule in MODULES:
                    edges.append((submodule, node.lineno, None))
                else:
                    edges.append((node.module, node.lineno, alias.name))
    return edges


def _import_graph() -> dict[str, dict[str, int]]:
    """module -> {module it imports: first line of such an import}."""
    graph: dict[str, dict[str, int]] = {name: {} for name in MODULES}
    for name, path in MODULES.items():
        for target, line, _ in _import_edges(path):
            if target != name:
                graph[name].setdefault(target, line)
    return graph


def _strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's components with more than one module (each a set of modules importing each other)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(components)


def _shortest_cycle(graph: dict[str, dict[str, int]], start: str, within: set[str]) -> list[str]:
    """The shortest import path from ``start`` back to ``start`` inside one component."""
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v]):
            if w == start:
                return paths[v] + [start]
            if w in within and w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    raise AssertionError(f"{start} is in a component but on no cycle")


def _cycle_text(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    short = [m.removeprefix("dora_analysis.") or "dora_analysis" for m in cycle]
    steps = [f"{short[i]} (line {graph[cycle[i]][cycle[i + 1]]})" for i in range(len(cycle) - 1)]
    return " -> ".join(steps + [short[-1]])


def test_no_import_cycles_deferred_and_type_checking_ones_included():
    graph = _import_graph()
    cycles = []
    for component in _strongly_connected(graph):
        cycles.append(
            "modules importing each other: " + ", ".join(m.removeprefix("dora_analysis.") for m in component)
        )
        seen = set()
        for start in component:
            cycle = _shortest_cycle(graph, start, set(component))
            key = frozenset(zip(cycle, cycle[1:], strict=False))
            if key not in seen:
                seen.add(key)
                cycles.append("  " + _cycle_text(graph, cycle))
    assert not cycles, "import cycles (module (line of the import) -> module it imports):\n" + "\n".join(
        cycles
    )


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_bindings(tree: ast.AST) -> dict[str, str]:
    """Local names bound to package modules: ``import dora_analysis.a.b as m``, ``from dora_analysis.a import b``."""
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    bound[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dora_analysis"):
            for alias in node.names:
                if f"{node.module}.{alias.name}" in MODULES:
                    bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return bound


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return None if inner is None else f"{inner}.{node.attr}"
    return None


def _private_uses(name: str, path: Path) -> list[str]:
    """Private names ``path`` takes from other package modules, and private modules from outside their package."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    where = str(path.relative_to(PACKAGE.parent))
    found = []
    for target, line, taken in _import_edges(path):
        if taken is not None and _is_private(taken):
            found.append(f"{where}:{line} imports {taken} from {target}")
        parent, _, leaf = target.rpartition(".")
        if _is_private(leaf) and not name.startswith(parent + ".") and name != parent:
            found.append(f"{where}:{line} imports the private module {target} from outside {parent}")
    bound = _module_bindings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            owner = _dotted(node.value)
            if owner is None:
                continue
            head, _, rest = owner.partition(".")
            module = bound.get(head)
            if module is None and owner in MODULES:
                module = owner
            elif module is not None and rest:
                module = f"{module}.{rest}"
            if module in MODULES and module != name:
                found.append(f"{where}:{node.lineno} uses {module}.{node.attr}")
    return found


def test_no_private_name_is_taken_from_another_module():
    found = [use for name, path in sorted(MODULES.items()) for use in _private_uses(name, path)]
    assert not found, "private names used outside their module:\n" + "\n".join(found)


def _function_lengths():
    import importlib.util
    import sys

    if "function_lengths" not in sys.modules:  # a dataclass needs its module registered while it loads
        spec = importlib.util.spec_from_file_location("function_lengths", TOOLS / "function_lengths.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["function_lengths"] = module
        spec.loader.exec_module(module)
    return sys.modules["function_lengths"]


def test_no_function_is_longer_than_a_screen():
    lengths = _function_lengths()
    offenders = lengths.too_long(PACKAGE)
    unexcused = [
        f"{f.code_lines} {f.name} ({f.path.relative_to(PACKAGE.parent)}:{f.line})" for f in offenders
    ]
    unexcused = [
        line for f, line in zip(offenders, unexcused, strict=True) if f.name not in lengths.EXCEPTIONS
    ]
    assert not unexcused, f"over {lengths.LIMIT} lines of code (tools/function_lengths.py):\n" + "\n".join(
        unexcused
    )


def test_the_exceptions_to_the_length_rule_are_few_named_and_still_needed():
    lengths = _function_lengths()
    assert len(lengths.EXCEPTIONS) <= MAX_LENGTH_EXCEPTIONS, sorted(lengths.EXCEPTIONS)
    long_names = {f.name for f in lengths.too_long(PACKAGE)}
    for name, why in lengths.EXCEPTIONS.items():
        assert why.strip(), f"{name}: say why it stays long"
        assert name in long_names, f"{name} is no longer over {lengths.LIMIT} lines: drop its exception"


def test_the_length_counter_skips_docstrings_comments_and_blank_lines(tmp_path: Path):
    lengths = _function_lengths()
    package = tmp_path / "pkg"
    package.mkdir()
    body = [
        '    """Doc.',
        "",
        '    More doc."""',
        "    # a comment",
        "",
        "    x = 1",
        "    y = (",
        "        2",
        "    )",
    ]
    text = "def f():\n" + "\n".join(body) + "\n    s = '''a\nb'''\n    return x + y\n"
    (package / "m.py").write_text(text, encoding="utf-8")
    (found,) = lengths.all_functions(package)
    # def line, x = 1, the three lines of y, the two of s, return: 8 lines of code
    assert (found.name, found.code_lines) == ("pkg.m.f", 8)
    assert lengths.too_long(package, limit=7) == [found] and lengths.too_long(package, limit=8) == []


def test_the_cycle_finder_finds_long_cycles_and_ignores_chains():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}, "e": {}}
    assert _strongly_connected(graph) == [["a", "b", "c"]]
    assert _shortest_cycle(graph, "b", {"a", "b", "c"}) == ["b", "c", "a", "b"]
    assert _strongly_connected({"a": {"b": 1}, "b": {}}) == []
