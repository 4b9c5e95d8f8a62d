"""`traceml compare` through the CLI: exit codes, outputs, summary.json inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_compare_verdicts import view
from typer.testing import CliRunner

from replay import compare as cp
from replay import compare_render as cr
from traceml.cli import app
from traceml.diagnosis import build_summary
from traceml.store import StoreView

runner = CliRunner()


def write_summary(path: Path, v: StoreView) -> Path:
    path.write_text(json.dumps(build_summary(v), allow_nan=False))
    return path


@pytest.fixture(scope="module")
def summaries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("summaries")
    return {
        "base": write_summary(d / "base.json", view(seed=1)),
        "same": write_summary(d / "same.json", view(seed=2)),
        "slow": write_summary(d / "slow.json", view(seed=3, forward=45_000.0)),
        "tiny": write_summary(d / "tiny.json", view(8, seed=4, forward=45_000.0)),
    }


def invoke(*args: str):
    return runner.invoke(app, ["compare", *args])


def test_summary_regression_exits_4_with_lower_confidence(summaries: dict[str, Path]) -> None:
    res = invoke(str(summaries["base"]), str(summaries["slow"]))
    assert res.exit_code == 4, res.output
    assert "REGRESSION" in res.output
    assert "lower confidence" in res.output


def test_summary_equivalent_exits_0(summaries: dict[str, Path]) -> None:
    res = invoke(str(summaries["base"]), str(summaries["same"]))
    assert res.exit_code == 0, res.output
    assert "verdict: EQUIVALENT" in res.output


def test_summary_with_few_steps_exits_3(summaries: dict[str, Path]) -> None:
    res = invoke(str(summaries["base"]), str(summaries["tiny"]))
    assert res.exit_code == 3, res.output
    assert "too few steps" in res.output


def test_missing_file_exits_1_and_bad_usage_exits_2(summaries: dict[str, Path], tmp_path: Path) -> None:
    res = invoke(str(summaries["base"]), str(tmp_path / "nope.tml"))
    assert res.exit_code == 1
    assert "not found" in res.output and "traceml compare: error: " in res.output
    assert invoke(str(summaries["base"])).exit_code == 2  # missing NEW argument: a usage error
    assert invoke(str(summaries["base"]), str(summaries["same"]), "--max-regression", "-1").exit_code == 2
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    res = invoke(str(summaries["base"]), str(bad))
    assert res.exit_code == 1 and "summary.json" in res.output


def test_newer_summary_schema_is_refused(summaries: dict[str, Path], tmp_path: Path) -> None:
    doc = json.loads(summaries["base"].read_text())
    doc["schema_version"] = 99
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps(doc))
    res = invoke(str(newer), str(summaries["same"]))
    assert res.exit_code == 1 and "upgrade traceml" in res.output


def test_out_writes_html_json_md(summaries: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    res = invoke(str(summaries["base"]), str(summaries["slow"]), "--out", str(out), "--max-regression", "5")
    assert res.exit_code == 4
    doc = json.loads((out / "compare.json").read_text())
    assert doc["verdict"] == "REGRESSION" and doc["exit_code"] == 4
    assert doc["method"] == "approximate" and doc["gate_pct"] == 5.0
    step = next(m for m in doc["metrics"] if m["name"] == "step_time")
    assert step["verdict"] == "REGRESSION" and step["ci_low_pct"] > 5
    assert {m["name"] for m in doc["metrics"]} >= {"step_time", "throughput", "phase.forward", "peak_rss"}
    md = (out / "compare.md").read_text()
    assert md.startswith("## traceml compare") and "REGRESSION" in md.splitlines()[0]
    page = (out / "compare.html").read_text()
    assert "<script src" not in page.lower() and 'id="chart-changes"' in page


def test_mixed_recording_and_summary_uses_the_approximation(summaries: dict[str, Path]) -> None:
    base = cp.side_from_summary(json.loads(summaries["base"].read_text()), "base.json")
    new = cp.side_from_view(view(seed=5, forward=45_000.0), "new.tml")
    c = cp.compare_sides(base, new)
    assert c.method == "approximate"
    assert c.verdict == cp.REGRESSION
    text = cr.render_text(c)
    assert "summary.json" in text and "no step distributions" in text


def test_help_documents_exit_codes() -> None:
    res = runner.invoke(app, ["compare", "--help"])
    assert res.exit_code == 0
    flat = " ".join(res.output.split())
    assert (
        "0 pass" in flat
        and "1 file error" in flat
        and "2 usage error" in flat
        and "3 inconclusive" in flat
        and "4 regression" in flat
    )
