"""Hypothesis crafts recordings whose names and metadata are random and hostile (unicode,
separators, control characters, ANSI/OSC escapes, Rich markup, HTML, Markdown, very long) and
runs every command on each: ``inspect`` (text and JSON), ``export`` (csv, chrome-trace),
``report``, ``compare``, ``recover`` and the terminal ``replay``.  No traceback, nothing written
outside the output directory, no raw control character on stdout (docs/security.md,
"Opening recordings from others")."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import pytest
from hostile import HOSTILE_NAMES, write_hostile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from traceml.cli import app

runner = CliRunner()
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
#: characters that matter to paths, terminals, markup and pages, and some unicode
TRICKY = list("/\\.:*?\"<>|[]`&'#!()_~$%@=\x00\x07\x08\x1b\x9b\x7f\r\n\t ") + [
    "\u202e",
    "\u2028",
    "\ufeff",
    "é",
    "中",
    "😀",
    "\ud800",
]
names = st.one_of(
    st.sampled_from(HOSTILE_NAMES),
    st.text(alphabet=st.one_of(st.sampled_from(TRICKY), st.characters(codec="utf-8")), min_size=1, max_size=40),
    st.text(alphabet=st.sampled_from(TRICKY + ["a", "b"]), min_size=1, max_size=600),
    st.sampled_from(["CON", "nul", "..", ".", "../" * 8 + "etc/passwd", "/tmp/x", "C:\\x", "~/x", "$HOME"]),
)


def clean_name(value: str) -> str:
    """Lone surrogates cannot be encoded by msgpack: the file would not be written at all."""
    return value.encode("utf-8", "replace").decode("utf-8")


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if not p.is_dir()}


@pytest.mark.slow
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(
    run_name=names,
    run_id=names,
    host=names,
    command=st.lists(names, min_size=1, max_size=4),
    tables=st.lists(names, min_size=1, max_size=3, unique=True),
    attachment=names,
    text=names,
)
def test_every_command_survives_hostile_names(
    run_name: str, run_id: str, host: str, command: list[str], tables: list[str], attachment: str, text: str
) -> None:
    tables = sorted({clean_name(t) for t in tables} - {"step_time"})
    with tempfile.TemporaryDirectory(prefix="traceml-names-") as tmp:
        root = Path(tmp)
        (root / "in").mkdir()
        (root / "cwd").mkdir()
        rec = write_hostile(
            root / "in" / "run.tml",
            run_name=clean_name(run_name),
            run_id=clean_name(run_id),
            host=clean_name(host),
            command=[clean_name(c) for c in command],
            tables=tables,
            attachment=clean_name(attachment),
            text=clean_name(text),
            steps=12,
        )
        out = root / "out"
        commands = [
            ["inspect", str(rec)],
            ["inspect", str(rec), "--json"],
            ["export", str(rec), "--format", "csv", "-o", str(out / "csv")],
            ["export", str(rec), "--format", "chrome-trace", "-o", str(out / "trace.json")],
            ["report", str(rec), "--out", str(out / "report")],
            ["compare", str(rec), str(rec), "--out", str(out / "compare"), "--resamples", "100"],
            ["recover", str(rec), "-o", str(out / "recovered.tml")],
            ["replay", str(rec), "--speed", "max", "--width", "120", "--no-progress"],
        ]
        before = os.getcwd()
        os.chdir(root / "cwd")
        try:
            for args in commands:
                result = runner.invoke(app, args)
                assert result.exception is None or isinstance(result.exception, SystemExit), (
                    args[0],
                    result.exception,
                )
                assert result.exit_code in (0, 3), (args, result.output)
                match = RAW_CONTROL.search(result.stdout)
                assert match is None, (args[0], result.stdout[max(0, match.start() - 60) : match.start() + 20])
        finally:
            os.chdir(before)
        stray = {p for p in files_under(root) if out not in p.parents and p != rec}
        assert not stray, sorted(map(str, stray))
        assert (out / "csv" / "step_time.csv").exists() and (out / "report" / "summary.md").exists()
        md = (out / "report" / "summary.md").read_text(encoding="utf-8")
        assert RAW_CONTROL.search(md) is None and re.search(r"(?<!\\)<", md) is None
