"""`traceml inspect | recover | export` through the CLI on real recordings in tmp_path."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_format_roundtrip import FakeClock, record_kinds, step_columns, writer
from typer.testing import CliRunner

from traceml.cli import app
from traceml.format import RecordKind, open_recording
from traceml.schema import PHASES

runner = CliRunner()


def process_columns(start: int, n: int) -> dict[str, np.ndarray]:
    ts = 1_760_000_000_000_000_000 + np.arange(start, start + n, dtype=np.int64) * 1_000_000_000
    return {
        "ts_ns": ts,
        "cpu_pct": np.full(n, 87.5, np.float32),
        "rss_bytes": np.full(n, 3 << 30, np.int64),
        "threads": np.full(n, 12, np.int32),
        "fds": np.full(n, 40, np.int32),
        "gpu_alloc_bytes": np.full(n, -1, np.int64),
        "gpu_reserved_bytes": np.full(n, -1, np.int64),
        "gpu_total_bytes": np.full(n, -1, np.int64),
    }


def make_run(path: Path) -> Path:
    clock = FakeClock()
    with writer(path, clock, run_meta={"run_id": "cli-run", "world_size": 2, "hosts": ["node-a"]}) as w:
        w.attach("environment/rank0", {"torch": "2.x"})
        for i in range(8):
            for rank in range(2):
                w.append(rank, "step_time", step_columns(i * 5, 5, rank))
            w.append(0, "process", process_columns(i, 1))
            clock.advance(1.0)
            w.tick()
        w.close(summary={"steps": 40})
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("cli") / "run.tml")


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args))


def test_inspect_text(run: Path) -> None:
    result = invoke("inspect", str(run))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "cli-run" in out and "format 1.2" in out and "node-a" in out
    assert "step_time" in out and "process" in out and "0..39" in out
    assert "compression:" in out and "per row on disk:" in out
    assert "complete: the writer closed the file cleanly" in out


def test_inspect_json(run: Path) -> None:
    result = invoke("inspect", str(run), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["header"]["run_id"] == "cli-run" and info["header"]["world_size"] == 2
    assert info["ranks"] == [0, 1]
    assert info["tables"]["step_time"]["rows"] == 80
    assert info["tables"]["step_time"]["ranks"] == [0, 1]
    assert (info["tables"]["step_time"]["step_min"], info["tables"]["step_time"]["step_max"]) == (0, 39)
    assert info["tables"]["process"]["rows"] == 8
    # 8 segments of rows, and the rollup written at close in a segment of its own
    assert info["segments"]["count"] == 9 and info["segments"]["rows"] == 88
    assert info["rollups"] == {"steps": 256, "tables": {"rollup/step_time": {"rows": 2, "ranks": [0, 1]}}}
    assert info["segments"]["compression_ratio"] > 1
    assert info["attachments"] == ["environment/rank0", "summary"]
    assert info["integrity"] == {
        "status": "complete",
        "skipped": [],
        "lost_bytes": 0,
        "message": "complete: the writer closed the file cleanly",
        "names": [],
    }


def test_inspect_reports_recovered_and_damaged(run: Path, tmp_path: Path) -> None:
    data = run.read_bytes()
    segment = [(off, n) for off, kind, n in record_kinds(run) if kind == RecordKind.SEGMENT]
    crashed = tmp_path / "crashed.tml"
    crashed.write_bytes(data[: segment[5][0] + 40])  # killed while writing segment 6
    result = invoke("inspect", str(crashed), "--json")
    info = json.loads(result.stdout)
    assert info["integrity"]["status"] == "recovered"
    assert info["integrity"]["lost_bytes"] == 40
    text = invoke("inspect", str(crashed)).stdout
    assert "recovered: the writer did not finish" in text

    damaged = bytearray(data)
    damaged[segment[2][0] + 60] ^= 0xFF
    broken = tmp_path / "damaged.tml"
    broken.write_bytes(bytes(damaged))
    result = invoke("inspect", str(broken))
    assert result.exit_code == 0
    assert "damaged: 1 span(s)" in result.stdout
    assert f"skipped {segment[2][1]:,} bytes at byte {segment[2][0]:,}" in result.stdout


def test_inspect_errors_are_one_line(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.tml"
    bogus.write_text("not a recording")
    result = invoke("inspect", str(bogus))
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("traceml inspect: error: ")
    assert "is not a readable .tml recording" in result.stderr
    result = invoke("inspect", str(tmp_path / "missing.tml"))
    assert result.exit_code == 1 and "cannot open recording" in result.stderr
    assert "Traceback" not in result.output


def test_recover_exit_codes(run: Path, tmp_path: Path) -> None:
    data = run.read_bytes()
    records = record_kinds(run)
    segment = [(off, n) for off, kind, n in records if kind == RecordKind.SEGMENT]

    clean = tmp_path / "clean.tml"
    result = invoke("recover", str(run), "-o", str(clean))
    assert result.exit_code == 0, result.output

    at_boundary = tmp_path / "boundary.tml"  # killed right after a record: nothing lost
    at_boundary.write_bytes(data[: segment[4][0] + segment[4][1]])
    fixed = tmp_path / "boundary_fixed.tml"
    result = invoke("recover", str(at_boundary), "-o", str(fixed))
    assert result.exit_code == 0, result.output
    with open_recording(fixed) as r:
        assert r.integrity["status"] == "complete"
        assert sum(len(c["step"]) for c in r.read_table("step_time").values()) == 50
        assert r.attachments["environment/rank0"] == {"torch": "2.x"}
        assert r.attachments["recovered_from"]["integrity"]["status"] == "recovered"
        assert r.header["run_id"] == "cli-run" and r.header["hosts"] == ["node-a"]

    mid_record = tmp_path / "mid.tml"
    mid_record.write_bytes(data[: segment[4][0] + 30])
    result = invoke("recover", str(mid_record), "-o", str(tmp_path / "mid_fixed.tml"))
    assert result.exit_code == 3, result.output
    assert "lost 30 bytes" in result.stdout

    damaged = bytearray(data)
    damaged[segment[1][0] + 50] ^= 0x01
    (tmp_path / "damaged.tml").write_bytes(bytes(damaged))
    out = tmp_path / "damaged_fixed.tml"
    result = invoke("recover", str(tmp_path / "damaged.tml"), "-o", str(out))
    assert result.exit_code == 3, result.output
    with open_recording(out) as r:
        assert r.integrity["status"] == "complete"
        steps = r.read_table("step_time")
        assert sum(len(c["step"]) for c in steps.values()) == 70  # segment 2 (10 rows) is gone
        assert r.attachments["summary"] == {"steps": 40}

    bogus = tmp_path / "bogus.tml"
    bogus.write_bytes(b"\x00" * 100)
    result = invoke("recover", str(bogus), "-o", str(tmp_path / "never.tml"))
    assert result.exit_code == 1 and result.stderr.startswith("traceml recover: error: ")
    assert not (tmp_path / "never.tml").exists() and not (tmp_path / "never.tml.partial").exists()
    result = invoke("recover", str(run), "-o", str(run))
    assert result.exit_code == 1 and "already exists" in result.stderr
    result = invoke("recover", str(run), "-o", str(run), "--overwrite")
    assert result.exit_code == 1 and "choose an output other than" in result.stderr


def test_export_csv(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "csv"
    result = invoke("export", str(run), "--format", "csv", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["process.csv", "step_time.csv"]
    with (out / "step_time.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 80
    assert list(rows[0])[:3] == ["rank", "step", "ts_ns"]
    rank1 = [r for r in rows if r["rank"] == "1"]
    expected = step_columns(0, 40, 1)
    assert [int(r["forward_us"]) for r in rank1] == expected["forward_us"].tolist()
    assert [int(r["ts_ns"]) for r in rank1] == expected["ts_ns"].tolist()
    with (out / "process.csv").open() as f:
        proc = list(csv.DictReader(f))
    assert len(proc) == 8 and float(proc[0]["cpu_pct"]) == 87.5


def test_export_chrome_trace_of_a_recording_without_phase_starts(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "trace.json"
    result = invoke("export", str(run), "--format", "chrome-trace", "-o", str(out), "--no-gzip")
    assert result.exit_code == 0, result.output
    trace = json.loads(out.read_text())
    # an older recording (no step_timeline): phases end to end, and the trace says so
    assert trace["otherData"]["phases"].startswith("end to end: this recording has no step_timeline")
    origin = trace["otherData"]["ts_origin_ns"]
    events = trace["traceEvents"]
    names = {(e["pid"], e["args"]["name"]) for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {(0, "rank 0"), (1, "rank 1")}
    for rank in range(2):
        expected = step_columns(0, 40, rank)
        steps = [e for e in events if e["ph"] == "X" and e["pid"] == rank and e["name"] == "step"]
        assert len(steps) == 40
        for i, step in enumerate(steps):
            assert step["args"]["step"] == i
            assert step["dur"] == expected["step_us"][i]
            assert step["ts"] + step["dur"] == pytest.approx((expected["ts_ns"][i] - origin) / 1000, abs=0.01)
            phases = [
                e
                for e in events
                if e["ph"] == "X"
                and e["pid"] == rank
                and e["name"] in PHASES
                and step["ts"] <= e["ts"] < step["ts"] + step["dur"]
            ]
            assert [p["name"] for p in phases] == [p for p in PHASES if expected[f"{p}_us"][i] > 0]
            cursor = step["ts"]
            for p in phases:  # end to end, filling the step
                assert p["ts"] == pytest.approx(cursor, abs=0.01)
                cursor += p["dur"]
            assert cursor == pytest.approx(step["ts"] + step["dur"], abs=0.01)
    counters = [e for e in events if e["ph"] == "C" and e["pid"] == 0]
    assert {e["name"] for e in counters} >= {"process cpu %", "process rss MiB"}


def test_export_errors(run: Path, tmp_path: Path) -> None:
    result = invoke("export", str(run), "--format", "avro", "-o", str(tmp_path / "x"))
    assert result.exit_code == 2  # a usage error; the choices are listed
    assert "Invalid value for '--format'" in result.stderr and "'avro' is not one of" in result.stderr
    result = invoke("export", str(tmp_path / "nope.tml"), "--format", "csv", "-o", str(tmp_path / "x"))
    assert result.exit_code == 1 and result.stderr.startswith("traceml export: error: cannot open recording")
