"""replay.report on hand-built StoreViews: summary.json (schema), self-contained HTML, Markdown."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jsonschema
import pytest
from test_diagnosis_summary import SCHEMA_PATH, rich_view
from test_diagnosis_support import RunBuilder

from replay import report as rp
from traceml import views
from traceml.diagnosis import build_summary
from traceml.errors import ReportError
from traceml.renderers import figures as fg
from traceml.store import StoreView

EXTERNAL = re.compile(r"<(script|link|img|iframe)[^>]+(src|href)\s*=\s*['\"]?(https?:)?//", re.I)


@pytest.fixture(scope="module")
def built() -> rp.Report:
    return rp.build_report(rich_view(), source="runs/demo.tml")


def test_summary_document_validates_and_carries_the_verdict(built: rp.Report) -> None:
    jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text())).validate(built.summary)
    assert built.summary["diagnosis"]["primary"]["kind"] == "STRAGGLER"
    assert built.summary["embedded_summary"] == {"present": False, "consistent": None, "differences": []}


def test_html_is_self_contained_with_every_section(built: rp.Report) -> None:
    page = built.html
    assert page.startswith("<!DOCTYPE html>")
    assert EXTERNAL.search(page) is None, "report.html must open offline: no external script/link/img"
    assert "<script src" not in page.lower()
    assert len(page) > 3_000_000  # the plotly.js bundle is inlined
    charts = ("steps", "ranks", "heatmap", "throughput", "memory", "system", "gpus")
    for name in charts:
        assert f'id="chart-{name}"' in page
    assert page.count("Plotly.newPlot(") == len(charts)
    for section in (
        "Diagnosis — whole run",
        "Diagnosis — last 100 steps",
        "Step time",
        "Memory",
        "GPUs",
        "Run",
        "Integrity",
    ):
        assert f">{section}<" in page
    assert "STRAGGLER" in page and "abc123" in page


def test_html_is_deterministic() -> None:
    view = rich_view()
    assert rp.build_report(view).html == rp.build_report(view).html


def test_markdown_leads_with_the_primary_verdict(built: rp.Report) -> None:
    md = built.markdown
    first = md.splitlines()[0]
    assert first.startswith("## traceml: demo") and "STRAGGLER" in first
    assert "| phase | job median ms | p95 ms | share of step time |" in md
    assert "Recording: live, nothing lost." in md
    assert len(md) < 4000  # short enough for a step summary


def test_embedded_summary_is_checked_against_the_data() -> None:
    view = rich_view()
    good = build_summary(view)
    same = dataclasses.replace(view, attachments={**view.attachments, "summary": good})
    assert rp.build_report(same).summary["embedded_summary"] == {"present": True, "consistent": True, "differences": []}
    tampered = json.loads(json.dumps(good))
    tampered["steps"]["count"] = 3
    tampered["diagnosis"]["primary"]["kind"] = "HEALTHY"
    other = dataclasses.replace(view, attachments={**view.attachments, "summary": tampered})
    rep = rp.build_report(other)
    emb = rep.summary["embedded_summary"]
    assert emb["present"] and emb["consistent"] is False
    assert any(d.startswith("steps.count") for d in emb["differences"])
    assert any(d.startswith("diagnosis.primary.kind") for d in emb["differences"])
    assert rep.summary["diagnosis"]["primary"]["kind"] == "STRAGGLER"  # recomputed, not copied
    assert "Embedded summary differs" in rep.markdown


def test_empty_recording_still_reports() -> None:
    rep = rp.build_report(StoreView())
    assert "INSUFFICIENT_DATA" in rep.markdown.splitlines()[0]
    assert "no steps recorded" in rep.html
    assert "memory: not recorded" in rep.html


def test_long_runs_are_reduced_in_charts() -> None:
    view = RunBuilder().steps(0, 12_000, noise=0.01).steps(1, 12_000, noise=0.01).view()
    for _, fig in rp.figures(view):
        assert fg.max_points(fig) <= views.MAX_POINTS


def test_single_rank_cpu_run_has_no_heatmap_or_gpu_chart() -> None:
    names = [name for name, _ in rp.figures(RunBuilder().steps(0, 30).view())]
    assert names == ["steps", "ranks", "throughput", "memory", "system"]


def test_write_documents_and_errors(tmp_path: Path, built: rp.Report) -> None:
    files = rp.write_documents(built, tmp_path / "out")
    assert json.loads(files.summary_json.read_text())["schema_version"] == 1
    assert files.summary_md.read_text().startswith("## traceml")
    assert files.html.stat().st_size > 3_000_000
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ReportError, match="--out"):
        rp.write_documents(built, blocker / "sub")
    with pytest.raises(ReportError, match="not found"):
        rp.load_view(tmp_path / "missing.tml")
