"""`traceml report` / `traceml compare` on real .tml files written with TmlWriter from hand-built rows.

The report runs in a subprocess where importing torch fails (and is recorded), so the
report path is proven torch-free.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from test_diagnosis_summary import SCHEMA_PATH
from test_diagnosis_support import GiB, RunBuilder, ddp_straggler
from typer.testing import CliRunner

from replay.report import load_view
from traceml.cli import app
from traceml.diagnosis import build_summary
from traceml.format import TmlWriter
from traceml.store import StoreView

EXTERNAL = re.compile(r"<(script|link|img|iframe)[^>]+(src|href)\s*=\s*['\"]?(https?:)?//", re.I)

#: runs the CLI with every ``import torch*`` failing, and reports any attempt on stderr
NO_TORCH = """
import atexit, sys
attempts = []
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            attempts.append(name)
            raise ImportError("torch is blocked in this test")
        return None
sys.meta_path.insert(0, _NoTorch())
atexit.register(lambda: attempts and sys.stderr.write("TORCH IMPORT ATTEMPTED: %s\\n" % attempts))
from traceml.cli import main
sys.argv = ["traceml", *sys.argv[1:]]
main()
"""


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def write_tml(path: Path, view: StoreView, *, summary: bool = True, crash_copy: Path | None = None) -> Path:
    """Write every table of ``view`` into a .tml with the attachments a finished run has.

    With ``crash_copy``, also copy the file as it was before ``close`` (no index, no footer),
    like a run whose writer died.
    """
    clock = FakeClock()
    meta = dict(view.meta)
    w = TmlWriter(path, run_meta=meta, fsync_interval_s=None, clock=clock)
    try:
        for (table, rank), cols in sorted(view.tables.items()):
            w.append(rank, table, dict(cols))
            clock.t += 2.0
            w.tick()
        w.attach("ranks", {"ranks": [info.to_dict() for info in view.rank_info.values()]})
        w.attach("exit", {"status": "ok", "exit_code": 0, "duration_s": 42.0})
        if crash_copy is not None:
            clock.t += 2.0
            w.tick()
            shutil.copyfile(path, crash_copy)
        w.close(summary=build_summary(view) if summary else None)
    finally:
        w.close()
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACEML_")}
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    b = ddp_straggler(n_ranks=2, culprit=1, extra_us=30_000.0)
    for r in range(2):
        b.process(r, np.linspace(2 * GiB, 2.05 * GiB, 40))
        b.rank(r, host="node0", node_rank=0, local_rank=r, state="finished", exit_status="ok")
    b.system(0, [35.0] * 20)
    b.store.set_meta(run_id="tml-run-1", run_name="tml-demo", world_size=2)
    return write_tml(tmp_path_factory.mktemp("rec") / "run.tml", b.view())


def test_report_from_a_recording_without_torch(recording: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    res = run_cli("report", str(recording), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "TORCH IMPORT ATTEMPTED" not in res.stderr
    assert res.stdout.startswith("STRAGGLER")
    summary = json.loads((out / "summary.json").read_text())
    jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text())).validate(summary)
    assert summary["run"]["id"] == "tml-run-1" and summary["run"]["world_size"] == 2
    assert summary["run"]["exit_status"] == "ok" and summary["run"]["duration_s"] == 42.0
    assert summary["run"]["hosts"] == ["node0"]
    assert summary["diagnosis"]["primary"]["kind"] == "STRAGGLER" and summary["diagnosis"]["primary"]["rank"] == 1
    assert summary["integrity"]["status"] == "complete" and summary["integrity"]["complete"] is True
    # the summary embedded at close was built from the same rows: recomputing agrees with it
    assert summary["embedded_summary"] == {"present": True, "consistent": True, "differences": []}
    page = (out / "report.html").read_text()
    assert EXTERNAL.search(page) is None and "Plotly.newPlot(" in page
    md = (out / "summary.md").read_text()
    assert md.splitlines()[0].startswith("## traceml: tml-demo") and "STRAGGLER" in md.splitlines()[0]


def test_recording_view_matches_the_hand_built_rows(recording: Path) -> None:
    view = load_view(recording)
    assert view.rows("step_time", 0) == 60 and view.rows("step_time", 1) == 60
    assert build_summary(view)["steps"]["count"] == 55


def test_crashed_recording_reports_what_was_lost(tmp_path: Path) -> None:
    b = RunBuilder().steps(0, 60, dataloader=40_000.0)
    crashed = tmp_path / "crashed.tml"
    write_tml(tmp_path / "whole.tml", b.view(), crash_copy=crashed)
    out = tmp_path / "out"
    res = run_cli("report", str(crashed), "--out", str(out))
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["integrity"]["status"] == "recovered"
    assert summary["integrity"]["complete"] is False and summary["integrity"]["recovered"] is True
    assert summary["embedded_summary"]["present"] is False  # the run never reached close
    assert summary["diagnosis"]["primary"]["kind"] == "INPUT_BOUND"
    assert "Recording: **recovered**" in (out / "summary.md").read_text()


def test_report_errors_exit_1(tmp_path: Path) -> None:
    res = run_cli("report", str(tmp_path / "missing.tml"))
    assert res.returncode == 1 and "not found" in res.stderr
    junk = tmp_path / "junk.tml"
    junk.write_bytes(b"not a recording at all" * 10)
    res = run_cli("report", str(junk), "--out", str(tmp_path / "o"))
    assert res.returncode == 1
    assert "Traceback" not in res.stderr


def test_report_default_out_dir_is_next_to_the_recording(recording: Path, tmp_path: Path) -> None:
    local = tmp_path / "r.tml"
    shutil.copyfile(recording, local)
    res = CliRunner().invoke(app, ["report", str(local)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r_report" / "report.html").is_file()


def test_compare_two_recordings(tmp_path: Path) -> None:
    base = write_tml(tmp_path / "base.tml", RunBuilder(seed=1).steps(0, 150).view())
    slow = write_tml(tmp_path / "slow.tml", RunBuilder(seed=2).steps(0, 150, forward=45_000.0).view())
    same = write_tml(tmp_path / "same.tml", RunBuilder(seed=3).steps(0, 150).view())
    runner = CliRunner()
    res = runner.invoke(app, ["compare", str(base), str(slow), "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 4, res.output
    doc = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert doc["method"] == "bootstrap" and doc["base"]["kind"] == "recording"
    assert doc["aligned_steps"] == {"first": 5, "last": 149, "count": 145}
    res = runner.invoke(app, ["compare", str(base), str(same)])
    assert res.exit_code == 0, res.output
    # a recording against a summary.json of another run: allowed, approximate
    report_dir = tmp_path / "rep"
    assert runner.invoke(app, ["report", str(slow), "--out", str(report_dir)]).exit_code == 0
    res = runner.invoke(app, ["compare", str(base), str(report_dir / "summary.json")])
    assert res.exit_code == 4, res.output
    assert "lower confidence" in res.output
