"""The committed sample traces (``sample_traces/*.tml``) show their known behaviours.

Each file is a real ``traceml run`` recording of a scenario in ``examples/scenarios/``;
``sample_traces/expected.json`` (written by ``scripts/record_samples.py`` from its hand-kept
table) says what its diagnosis must be.  The files are fixed and the diagnosis is pure, so
these tests are deterministic.  One file goes through ``traceml report`` (and ``traceml
inspect --json``) in a child process; the others through the Python API.
"""

from __future__ import annotations

import importlib.util
import json
import os
import runpy
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import replay
from replay.report import build_report, load_view
from traceml.format import open_recording

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_traces"
EXPECTED_PATH = SAMPLES / "expected.json"
TRACEML = str(Path(sys.executable).with_name("traceml"))
#: the file checked through the CLI; every other one through the Python API
CLI_SAMPLE = "ddp_input_straggler.tml"

EXPECTED: dict[str, Any] = json.loads(EXPECTED_PATH.read_text(encoding="utf-8"))
TRACES: dict[str, dict[str, Any]] = EXPECTED["traces"]
API_SAMPLES = sorted(name for name in TRACES if name != CLI_SAMPLE)
SCENARIO_SCRIPTS = sorted((ROOT / "examples" / "scenarios").glob("*.py"))


def _finding_matches(finding: Mapping[str, Any], want: Mapping[str, Any]) -> bool:
    for key, value in want.items():
        if key == "labels":
            labels = finding.get("labels") or {}
            if any(labels.get(k) != v for k, v in value.items()):
                return False
        elif finding.get(key) != value:
            return False
    return True


def _assert_summary(name: str, summary: Mapping[str, Any]) -> None:
    want = TRACES[name]
    diag = summary["diagnosis"]
    primary, findings = diag["primary"], diag["findings"]
    seen = [(f["kind"], f["severity"], f["rank"], f["labels"]) for f in findings]
    for key, value in want["primary"].items():
        assert primary[key] == value, (
            f"{name}: primary {key} {primary[key]!r}, expected {value!r} ({primary['summary']})"
        )
    assert primary in findings, f"{name}: the primary verdict is not among the findings {seen}"
    for required in want["findings"]:
        assert any(_finding_matches(f, required) for f in findings), f"{name}: no finding {required} in {seen}"
    for kind in want["absent"]:
        assert kind not in [f["kind"] for f in findings], f"{name}: {kind} should not be found; found {seen}"
    assert summary["integrity"]["status"] == want["integrity"], f"{name}: integrity {summary['integrity']}"
    assert summary["steps"]["count"] >= want["min_steps"], f"{name}: {summary['steps']['count']} steps analysed"
    assert summary["run"]["world_size"] == want["world_size"]
    if want["exit_status"] is not None:
        assert summary["run"]["exit_status"] == want["exit_status"]


def test_expected_json_lists_every_sample_and_only_those() -> None:
    on_disk = sorted(p.name for p in SAMPLES.glob("*.tml"))
    assert on_disk == sorted(TRACES), "sample_traces/*.tml and expected.json disagree: re-run scripts/record_samples.py"
    scenarios = {str(p.relative_to(ROOT)) for p in SCENARIO_SCRIPTS}
    assert scenarios == {t["scenario"] for t in TRACES.values()}, "every scenario script has a sample, and only those"
    kinds = {t["primary"]["kind"] for t in TRACES.values()}
    # the six behaviours the samples exist for
    assert {"COMPUTE_BOUND", "INPUT_BOUND", "STRAGGLER", "MEMORY_CREEP"} <= kinds
    assert {"complete", "recovered"} == {t["integrity"] for t in TRACES.values()}


def test_expected_json_is_the_record_scripts_table() -> None:
    """expected.json comes from the hand-kept table in scripts/record_samples.py, not from an edit."""
    spec = importlib.util.spec_from_file_location("record_samples", ROOT / "scripts" / "record_samples.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
        table = {s.file: s.expected() for s in module.SCENARIOS}
        assert EXPECTED["max_bytes"] == module.MAX_SAMPLE_BYTES
    finally:
        del sys.modules[spec.name]
    assert table == TRACES


@pytest.mark.parametrize("name", sorted(TRACES))
def test_sample_is_small(name: str) -> None:
    size = (SAMPLES / name).stat().st_size
    assert 0 < size <= EXPECTED["max_bytes"] <= 1 << 20, f"{name}: {size} bytes"


@pytest.mark.parametrize("name", API_SAMPLES)
def test_report_api_finds_the_known_behaviour(name: str) -> None:
    view = load_view(SAMPLES / name)
    report = build_report(view, source=name)
    _assert_summary(name, report.summary)
    # pure: the same file gives the same verdicts again
    again = build_report(load_view(SAMPLES / name), source=name).summary
    assert again["diagnosis"] == report.summary["diagnosis"]


def test_report_cli_finds_the_known_behaviour(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACEML_")}
    proc = subprocess.run(
        [TRACEML, "report", str(SAMPLES / CLI_SAMPLE), "--out", str(tmp_path / "report")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "report" / "summary.json").read_text(encoding="utf-8"))
    _assert_summary(CLI_SAMPLE, summary)
    first_line = proc.stdout.splitlines()[0]
    assert first_line.startswith(f"{TRACES[CLI_SAMPLE]['primary']['kind']} (")
    assert (tmp_path / "report" / "report.html").stat().st_size > 0
    md = (tmp_path / "report" / "summary.md").read_text(encoding="utf-8")
    assert TRACES[CLI_SAMPLE]["primary"]["kind"] in md


@pytest.mark.parametrize("name", sorted(TRACES))
def test_steps_before_the_end_are_readable(name: str) -> None:
    """Every rank's step_time holds steps 0 .. readable_steps-1 (for a crash: those before it)."""
    want = TRACES[name]
    with replay.open(SAMPLES / name) as rec:
        assert rec.ranks == list(range(want["world_size"]))
        for rank in rec.ranks:
            cols = rec.columns("step_time", rank)
            missing = np.setdiff1d(np.arange(want["readable_steps"]), cols["step"])
            assert len(missing) == 0, f"{name} rank {rank}: steps {missing[:10].tolist()} not readable"
            assert (cols["failed"] == 0).all()


@pytest.mark.parametrize("name", sorted(TRACES))
def test_integrity_from_the_format_reader(name: str) -> None:
    want = TRACES[name]["integrity"]
    with open_recording(SAMPLES / name) as reader:
        integrity = reader.integrity
        attachments = set(reader.attachments)
    assert integrity["status"] == want, integrity
    assert integrity["lost_bytes"] == 0 and not integrity["skipped"], integrity
    if want == "recovered":
        # killed: no footer, so none of what is written when a run ends
        assert not attachments & set(replay.engine.END_ATTACHMENTS), attachments
    else:
        assert {"summary", "exit"} <= attachments


def test_replay_cli_plays_a_sample_to_its_verdict() -> None:
    """The README's ``traceml replay sample_traces/<file>.tml --speed max``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACEML_")}
    proc = subprocess.run(
        [TRACEML, "replay", str(SAMPLES / CLI_SAMPLE), "--speed", "max"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"{TRACES[CLI_SAMPLE]['primary']['kind']}: rank 1" in proc.stdout


def test_inspect_cli_reports_the_crash() -> None:
    crashed = [n for n, t in TRACES.items() if t["integrity"] == "recovered"]
    assert crashed
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACEML_")}
    proc = subprocess.run(
        [TRACEML, "inspect", str(SAMPLES / crashed[0]), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["integrity"]["status"] == "recovered"
    assert info["tables"]["step_time"]["rows"] >= TRACES[crashed[0]]["readable_steps"]


@pytest.mark.parametrize("script", SCENARIO_SCRIPTS, ids=lambda p: p.stem)
def test_scenario_script_runs_and_is_traced(
    script: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each scenario runs a few steps as plain python (in this process: torch loads once), its
    ``trace_step`` recording one row per step to a local .tml (``TRACEML_OUT``)."""
    torch = pytest.importorskip("torch")
    import traceml

    out = tmp_path / f"{script.stem}.tml"
    for name in [k for k in os.environ if k.startswith("TRACEML_")] + ["RANK", "WORLD_SIZE"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TRACEML_OUT", str(out))
    monkeypatch.setattr(sys, "argv", [str(script), "--steps", "3", "--log-every", "1"])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        traceml.shutdown()
        torch.set_num_threads(threads)
    assert "step 3/3" in capsys.readouterr().out
    with open_recording(out) as reader:
        steps = reader.read_table("step_time")[0]["step"]
    assert steps.tolist() == [0, 1, 2]
