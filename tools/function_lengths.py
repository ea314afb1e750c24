"""Functions longer than a screen: every function or method in the package over 60 lines of code.

Lines of code are the lines of a ``def`` (from the ``def`` line to its last line, nested functions
included) that hold a token of code: blank lines, comment-only lines and docstrings do not count;
decorators do not either. A multi-line string that is not a docstring counts each of its lines.

Run from the repository root: ``python tools/function_lengths.py`` prints one line per offender
(``lines  qualified.name  path:line``) and exits 1 if there is any not named in :data:`EXCEPTIONS`.
``tests/test_architecture.py`` runs the same check.
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

LIMIT = 60
PACKAGE = Path(__file__).resolve().parents[1] / "dora_analysis"

# {qualified name: why it stays longer than LIMIT}. Keep this small: each entry needs a reason a
# reviewer accepts, and the test fails on an entry that no longer names a long function.
EXCEPTIONS: dict[str, str] = {}

_NOT_CODE = {
    tokenize.COMMENT,
    tokenize.NL,
    tokenize.NEWLINE,
    tokenize.INDENT,
    tokenize.DEDENT,
    tokenize.ENCODING,
    tokenize.ENDMARKER,
}


@dataclass(frozen=True)
class Function:
    name: str  # qualified: dora_analysis.<module>.<Class>.<function>, nested ones as outer.<locals>.inner
    path: Path
    line: int
    code_lines: int


def code_lines(source: str) -> set[int]:
    """The 1-based line numbers of ``source`` that hold code (a token other than a comment)."""
    lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in _NOT_CODE:
            lines.update(range(token.start[0], token.end[0] + 1))
    return lines


def docstring_lines(tree: ast.AST) -> set[int]:
    """The lines of every docstring (module, class, function) in ``tree``."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def functions(path: Path, package: Path = PACKAGE) -> list[Function]:
    """Every function and method defined in ``path``, nested ones included, with its lines of code."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    counted = code_lines(source) - docstring_lines(tree)
    found: list[Function] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}.{child.name}"
                span = range(child.lineno, child.end_lineno + 1)
                found.append(Function(name, path, child.lineno, len(counted.intersection(span))))
                visit(child, f"{name}.<locals>")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}.{child.name}")
            else:
                visit(child, prefix)

    visit(tree, module_name(path, package))
    return found


def all_functions(package: Path = PACKAGE) -> list[Function]:
    paths = sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)
    return [f for path in paths for f in functions(path, package)]


def too_long(package: Path = PACKAGE, limit: int = LIMIT) -> list[Function]:
    """Functions over ``limit`` lines of code, longest first (exceptions included)."""
    return sorted(
        (f for f in all_functions(package) if f.code_lines > limit), key=lambda f: (-f.code_lines, f.name)
    )


def main() -> int:
    offenders = too_long()
    root = PACKAGE.parent
    for f in offenders:
        note = "  (exception)" if f.name in EXCEPTIONS else ""
        print(f"{f.code_lines:4d}  {f.name}  {f.path.relative_to(root)}:{f.line}{note}")
    unexcused = [f for f in offenders if f.name not in EXCEPTIONS]
    print(f"{len(unexcused)} function(s) over {LIMIT} lines of code, {len(EXCEPTIONS)} exception(s)")
    return 1 if unexcused else 0


if __name__ == "__main__":
    sys.exit(main())
