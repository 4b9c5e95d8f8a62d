"""The house's import graph: ``traceml --help`` and ``python -m replay`` stay light, and replay
never re-enters the traceml CLI.  Each check runs in a fresh interpreter so nothing this test
process imported can hide a leak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import grimp

#: what a help screen must not pay for (the format room's codecs, the engine's arrays)
HEAVY = ("numpy", "zstandard", "replay.engine", "torch", "dash")


def python(code: str) -> dict[str, object]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TRACEML_")}, "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_traceml_help_and_replay_help_load_neither_numpy_nor_zstandard() -> None:
    out = python(
        f"""
        import json, sys
        from traceml.cli.app import app
        after_import = [m for m in {HEAVY!r} if m in sys.modules]
        helps = {{}}
        for argv in (["--help"], ["replay", "--help"]):
            try:
                app(args=argv, prog_name="traceml")
            except SystemExit as exc:
                helps[" ".join(argv)] = exc.code
        print(json.dumps({{"after_import": after_import, "after_help": [m for m in {HEAVY!r} if m in sys.modules],
                          "codes": helps, "replay_cli": "replay.cli" in sys.modules}}))
        """
    )
    assert out["after_import"] == []
    assert out["after_help"] == []
    assert out["codes"] == {"--help": 0, "replay --help": 0}
    assert out["replay_cli"] is True  # the command is registered from replay.cli, not a copy


def test_python_m_replay_runs_without_the_traceml_cli() -> None:
    out = python(
        """
        import contextlib, io, json, runpy, sys
        sys.argv = ["replay", "--help"]
        buf = io.StringIO()
        code = None
        with contextlib.redirect_stdout(buf):
            try:
                runpy.run_module("replay", run_name="__main__", alter_sys=True)
            except SystemExit as exc:
                code = exc.code
        print(json.dumps({"code": code, "cli": sorted(m for m in sys.modules if m.startswith("traceml.cli")),
                          "usage": buf.getvalue()}))
        """
    )
    assert out["code"] == 0
    assert out["cli"] == []
    assert "Usage: python -m replay [OPTIONS] {recording}" in str(out["usage"]), out["usage"]


def test_the_lazy_replay_face_still_reaches_its_names_and_submodules() -> None:
    out = python(
        """
        import json, sys
        import replay
        before = "replay.engine" in sys.modules
        rec, opener = replay.Recording, replay.open
        print(json.dumps({"before": before, "names": [rec.__module__, opener.__module__],
                          "engine_attr": replay.engine.__name__, "dir": "open" in dir(replay)}))
        """
    )
    assert out == {
        "before": False,
        "names": ["replay.engine", "replay.engine"],
        "engine_attr": "replay.engine",
        "dir": True,
    }


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            nxt = next((w for w in edges if w in graph.modules), None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.find_modules_directly_imported_by(nxt)))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_the_cycle_finder_finds_a_circle() -> None:
    graph = grimp.ImportGraph()
    for a, b in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")):
        graph.add_import(importer=a, imported=b)
    assert _cycles(graph) == [["p.a", "p.b", "p.c"]]


def test_no_import_cycles_among_traceml_and_replay_modules() -> None:
    # TYPE_CHECKING imports count: a circle drawn only for the type checker is still a circle
    graph = grimp.build_graph("traceml", "replay", cache_dir=None)
    assert len(graph.modules) > 100, sorted(graph.modules)
    assert _cycles(graph) == []
    # the one circle there was (store/columns <-> store/view through RankInfo) stays gone
    assert graph.find_shortest_chain("traceml.store.view", "traceml.store.columns") is None
    # the aggregator reads the view's vocabulary from the store, not from the views room
    assert not any(m.startswith("traceml.views") for m in _imported_by_package(graph, "traceml.aggregator"))


def _imported_by_package(graph: grimp.ImportGraph, package: str) -> set[str]:
    return {
        imported
        for module in graph.find_descendants(package) | {package}
        for imported in graph.find_modules_directly_imported_by(module)
    }
