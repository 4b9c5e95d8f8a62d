"""The house's import graph: ``traceml --help`` and ``python -m replay`` stay light, and replay
never re-enters the traceml CLI.  Each check runs in a fresh interpreter so nothing this test
process imported can hide a leak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

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
