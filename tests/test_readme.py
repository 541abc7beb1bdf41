"""The README names the test holding each promise: every one it names must exist, or the promise has no test."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# `tests/x.py`, `tests/x.py::name`, or `…::name` (the file named last before it in the same paragraph);
# a name ending in `…` is a prefix.
REFERENCE = re.compile(r"(?:(tests/[\w/.]+\.py)|…)(?:::(\w+)(…)?)?")


def _test_names(path: Path) -> set[str]:
    return {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def readme_test_references(text: str) -> list[tuple[int, str, str | None, bool]]:
    """(line, file, test name or None, is a prefix) for every test the text names; a `…::name` takes
    the file named last before it in its paragraph (a blank line ends one; a table row is one)."""
    found: list[tuple[int, str, str | None, bool]] = []
    last: str | None = None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("|"):
            last = None
        for m in REFERENCE.finditer(line):
            path, name, ellipsis = m.group(1), m.group(2), m.group(3)
            if path:
                last = path
            elif name is None:
                continue
            found.append((lineno, path or last or "", name, bool(ellipsis)))
    return found


def test_every_test_the_readme_names_exists() -> None:
    refs = readme_test_references((ROOT / "README.md").read_text())
    assert len([r for r in refs if r[2]]) > 50  # the Reliability table alone names more
    problems = []
    for lineno, path, name, prefix in refs:
        if not path:
            problems.append(f"README.md:{lineno}: …::{name} follows no tests/ file")
        elif not (ROOT / path).is_file():
            problems.append(f"README.md:{lineno}: no file {path}")
        elif name and not any(n == name or (prefix and n.startswith(name)) for n in _test_names(ROOT / path)):
            problems.append(f"README.md:{lineno}: no test {path}::{name}{'…' if prefix else ''}")
    assert not problems, "\n".join(problems)
