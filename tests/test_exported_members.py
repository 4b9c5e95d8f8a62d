"""Each package face (``__init__.py`` of traceml, its rooms and replay) lists what it offers in
``__all__``: sorted (constants, then classes, then the rest, as ruff's RUF022 sorts), without
duplicates, complete (every public name the face defines, and every name it imports from traceml
or replay only to offer it, is listed) and true (every listed name resolves, also on lazy faces)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FACES = sorted(
    p.parent.relative_to(ROOT).as_posix().replace("/", ".")
    for pkg in ("traceml", "replay")
    for p in (ROOT / pkg).rglob("__init__.py")
)


def _sort_key(name: str) -> tuple[int, str]:
    if name.upper() == name and any(c.isalpha() for c in name):
        return 0, name  # SCREAMING_SNAKE_CASE
    if name[:1].isupper():
        return 1, name  # CamelCase
    return 2, name


def _face(source: str) -> tuple[list[str] | None, set[str]]:
    """``__all__`` as written (None when absent) and the public names the face offers: its own
    definitions, and what it imports from traceml or replay (also under TYPE_CHECKING) without
    using it itself."""
    tree = ast.parse(source)
    listed: list[str] | None = None
    defined: set[str] = set()
    imported: set[str] = set()
    body = list(tree.body)
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            body.extend(node.body)
    for node in body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            listed = list(ast.literal_eval(node.value))
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").split(".")[0] in ("traceml", "replay")
        ):
            imported |= {alias.asname or alias.name for alias in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined |= {t.id for t in targets if isinstance(t, ast.Name)}
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    offered = defined | (imported - used)
    return listed, {n for n in offered if not n.startswith("_")}


def _problems(package: str, source: str) -> list[str]:
    listed, offered = _face(source)
    if listed is None:
        return [f"{package} offers {sorted(offered)} but has no __all__; add one listing them"] if offered else []
    out = []
    if len(listed) != len(set(listed)):
        out.append(f"{package}.__all__ lists a name twice")
    if listed != sorted(listed, key=_sort_key):
        out.append(
            f"{package}.__all__ is not sorted (constants, classes, the rest): expected {sorted(listed, key=_sort_key)}"
        )
    missing = sorted(offered - set(listed))
    if missing:
        out.append(f"{package} offers {missing} without listing them in __all__ (list them, or import them privately)")
    return out


def test_the_faces_are_found() -> None:
    assert {"traceml", "traceml.store", "traceml.format", "traceml.transport", "traceml.views", "replay"} <= set(FACES)


@pytest.mark.parametrize("package", FACES)
def test_all_is_sorted_complete_and_true(package: str) -> None:
    source = (ROOT / package.replace(".", "/") / "__init__.py").read_text(encoding="utf-8")
    assert _problems(package, source) == []
    listed, _ = _face(source)
    module = importlib.import_module(package)
    unresolved = [name for name in listed or [] if not hasattr(module, name)]
    assert not unresolved, f"{package}.__all__ lists {unresolved}, which the package does not have"


def test_the_check_catches_an_unsorted_incomplete_face_and_one_without_all() -> None:
    bad = (
        "from traceml.store.view import StoreView, RankInfo\n"
        "from traceml.errors import StoreError\n"
        "LIMIT = 3\n"
        "def helper(): raise StoreError(LIMIT)\n"
        "__all__ = ['helper', 'StoreView', 'LIMIT', 'helper']\n"
    )
    problems = _problems("fake", bad)
    assert any("twice" in p for p in problems)
    assert any("not sorted" in p and "['LIMIT', 'StoreView', 'helper', 'helper']" in p for p in problems)
    assert any("offers ['RankInfo'] without listing" in p for p in problems)  # StoreError is used, not offered
    assert _problems("bare", "def offered(): pass\n") == [
        "bare offers ['offered'] but has no __all__; add one listing them"
    ]
