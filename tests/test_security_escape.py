"""One escaping layer per medium (``traceml.escape``), and every command that shows names from a
recording uses it: ``inspect``, the terminal replay, ``export``, ``report`` (HTML, Markdown, JSON)
and ``compare``, run on a real recording whose names are hostile.  Golden-style: the hostile
text must appear in its escaped form, and nothing raw (control characters, markup, HTML) may."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hostile import HOSTILE_NAMES, write_hostile
from rich.console import Console
from rich.text import Text
from typer.testing import CliRunner

from traceml import escape as esc
from traceml.cli import app

runner = CliRunner()
#: raw control characters a terminal would act on (C0 but newline, DEL, C1) and bidi overrides
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
ANSI = "\x1b[2J\x1b[31mred\x1b]0;title\x07"
MARKUP = "[/bold][red]x[/red]"
HTML = "</title><script>alert(1)</script><img src=x onerror=alert(2)>"
MD = "*b* _e_ `c` | p # [l](https://evil) ![i](x) <b>h</b> &amp;"


def test_visible_shows_control_characters_as_escapes() -> None:
    assert esc.visible(ANSI) == "\\x1b[2J\\x1b[31mred\\x1b]0;title\\x07"
    assert esc.visible("a\nb\u202ec\x9b\x00") == "a\\x0ab\\u202ec\\x9b\\x00"
    assert esc.visible("ünïcode ✓ 中文") == "ünïcode ✓ 中文"
    assert esc.visible("x" * 500) == "x" * 199 + "…" and len(esc.visible("x" * 500, 20)) == 20


@pytest.mark.parametrize("name", [*HOSTILE_NAMES, MARKUP, "a\\", "\\[bold]x", "[link=x]y[/link]"])
def test_rich_markup_is_shown_as_typed(name: str) -> None:
    text = Text.from_markup(esc.rich(name, None) + "[bold]after[/bold]")
    assert text.plain == esc.visible(name, None) + "after"
    assert not RAW_CONTROL.search(text.plain)


def test_html_and_markdown_are_inert() -> None:
    assert esc.html(HTML) == "&lt;/title&gt;&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;"
    assert esc.html("\"'&") == "&quot;&#x27;&amp;"
    md = esc.markdown(MD + HTML)
    assert "<" not in md.replace("\\<", "") and "[" not in md.replace("\\[", "") and "|" not in md.replace("\\|", "")
    assert "`" not in md.replace("\\`", "") and "*" not in md.replace("\\*", "") and "&" not in md.replace("\\&", "")
    assert esc.markdown("a\nb") == "a\\\\x0ab"  # no line break: no new table row, heading or HTML block
    assert esc.markdown_code("a`b|c") == "``a`b¦c``"


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("esc")
    return write_hostile(
        root / "run.tml",
        run_id=ANSI + MARKUP,
        run_name=MARKUP + ANSI + HTML + MD,
        host=ANSI + MARKUP + HTML,
        command=["train.py", ANSI, MARKUP, HTML, MD],
        tables=[MARKUP, ANSI, "../../x", ":smile:"],
        attachment="[/bold]att",
        text=ANSI + HTML,
        steps=40,
    )


def assert_clean_terminal(output: str) -> None:
    match = RAW_CONTROL.search(output)
    assert match is None, (
        f"raw {match.group()!r} at {match.start()}: {output[max(0, match.start() - 40) : match.start() + 40]!r}"
    )


def test_inspect_shows_hostile_names_escaped(hostile_run: Path) -> None:
    result = runner.invoke(app, ["inspect", str(hostile_run)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert_clean_terminal(result.stdout)
    assert "run \\x1b[2J\\x1b[31mred\\x1b]0;title\\x07[/bold][red]x[/red]" in result.stdout
    assert "command: train.py \\x1b[2J" in result.stdout and "[/bold]att" in result.stdout
    assert ":smile:" in result.stdout  # no emoji codes either: names are shown as typed
    as_json = runner.invoke(app, ["inspect", str(hostile_run), "--json"])
    assert as_json.exit_code == 0 and json.loads(as_json.stdout)["header"]["run_id"] == ANSI + MARKUP
    assert_clean_terminal(as_json.stdout)


def test_terminal_replay_shows_hostile_names_escaped(hostile_run: Path) -> None:
    result = runner.invoke(app, ["replay", str(hostile_run), "--speed", "max", "--width", "400", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert_clean_terminal(result.stdout)
    assert "[/bold][red]x[/red]\\x1b[2J\\x1b[31mred" in result.stdout  # the run name, as typed


def test_export_messages_are_escaped(hostile_run: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["export", str(hostile_run), "--format", "csv", "-o", str(tmp_path / "csv")])
    assert result.exit_code == 0, result.output
    assert_clean_terminal(result.output)
    assert "(table '\\x1b[2J\\x1b[31mred\\x1b]0;title\\x07')" in result.stdout


def test_report_documents_escape_hostile_names(hostile_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "rep"
    result = runner.invoke(app, ["report", str(hostile_run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert_clean_terminal(result.stdout)
    md = (out / "summary.md").read_text(encoding="utf-8")
    assert_clean_terminal(md.replace("\n", ""))
    first = md.splitlines()[0]
    assert first.startswith("## traceml: \\[/bold\\]\\[red\\]x\\[/red\\]\\\\x1b\\[2J"), first
    unescaped = re.compile(r"(?<!\\)(<|\]\(|!\[|`)")  # raw HTML, links, images, code spans
    assert unescaped.search(md) is None, unescaped.search(md)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["run"]["name"] == MARKUP + ANSI + HTML + MD  # JSON keeps the data exactly, as data
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "<script>alert(1)" not in page and "<img src=x" not in page and "\x1b" not in page


def test_compare_escapes_paths_from_elsewhere(hostile_run: Path, tmp_path: Path) -> None:
    odd = tmp_path / "x`<img src=x>\x1b[31m.tml"
    odd.write_bytes(hostile_run.read_bytes())
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", str(odd), str(hostile_run), "--out", str(out), "--resamples", "200"])
    assert result.exit_code in (0, 3), result.output
    assert_clean_terminal(result.stdout)
    md = (out / "compare.md").read_text(encoding="utf-8")
    assert f"Base ``{tmp_path}/x`<img src=x>\\x1b[31m.tml``" in md  # as typed, inside a code span: never HTML
    assert_clean_terminal(md.replace("\n", ""))


def test_live_and_final_renderers_escape_names() -> None:
    from traceml.renderers.terminal import render_final, render_live
    from traceml.store import ColumnStore
    from traceml.views import final_model, live_model

    store = ColumnStore()
    store.set_meta(run_name=MARKUP + ANSI, run_id="r")
    console = Console(width=200, record=True, color_system=None, force_terminal=False)
    view = store.snapshot()
    console.print(render_live(live_model(view)))
    console.print(render_final(final_model(view)))
    text = console.export_text()
    assert_clean_terminal(text)
    assert text.count("[/bold][red]x[/red]\\x1b[2J") == 2
