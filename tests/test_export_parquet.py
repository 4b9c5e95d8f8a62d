"""`traceml export --format parquet`: real recordings exported through the CLI and read back with DuckDB."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from traceml.cli import app
from traceml.errors import MissingDependencyError
from traceml.format import open_recording
from traceml.testing.synthetic import rank_infos, run_meta, synthetic_run, write_recording

duckdb = pytest.importorskip("duckdb")
pq = pytest.importorskip("pyarrow.parquet")

from traceml.format.parquet import (  # noqa: E402
    export_parquet,
    run_partition_value,
    safe_table_name,
    table_directory,
)

runner = CliRunner()


def make_recording(path: Path, name: str, ranks: int, steps: int, seed: int = 0, **writer_options: Any) -> Path:
    run = synthetic_run(ranks=ranks, steps=steps, seed=seed, nodes=2 if ranks > 1 else 1)
    infos = rank_infos(run)
    for info in infos:
        info["node_rank"] = info["rank"] * 2 // ranks
    write_recording(
        path,
        run,
        meta=run_meta(name, ranks),
        attachments={"ranks": {"ranks": infos}},
        chunk_steps=max(1, steps // 7),
        **writer_options,
    )
    return path


def query(sql: str, *params: Any) -> list[tuple[Any, ...]]:
    con = duckdb.connect()
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()


def export(src: Path, out: Path, *extra: str) -> Any:
    result = runner.invoke(app, ["export", str(src), "--format", "parquet", "-o", str(out), *extra])
    assert result.exit_code == 0, result.output
    return result


def test_export_reads_back_in_duckdb_with_the_recording_values(tmp_path: Path) -> None:
    src = make_recording(tmp_path / "a.tml", "alpha", ranks=4, steps=2_000)
    out = tmp_path / "pq"
    result = export(src, out)
    assert "rank=<r>" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["process", "step_time", "system"]
    assert sorted(p.name for p in (out / "step_time").iterdir()) == [f"rank={r}" for r in range(4)]

    glob = str(out / "step_time" / "**" / "*.parquet")
    rows = query(
        "select rank, node, run_id, run_name, count(*), sum(step_us), min(step), max(step), sum(forward_us)"
        " from read_parquet(?, hive_partitioning=true) group by all order by rank",
        glob,
    )
    with open_recording(src) as reader:
        expected = reader.read_table("step_time")
        process = reader.read_table("process")
    assert [r[0] for r in rows] == [0, 1, 2, 3]
    for rank, node, run_id, run_name, count, total, lo, hi, forward in rows:
        cols = expected[rank]
        assert (node, run_id, run_name) == (rank // 2, "alpha-0001", "alpha")
        assert count == len(cols["step"]) == 2_000
        assert total == int(cols["step_us"].sum())
        assert (lo, hi) == (int(cols["step"].min()), int(cols["step"].max()))
        assert forward == int(cols["forward_us"].sum())
    # row by row, one rank: the same values in the same order of steps
    got = query(
        "select step, ts_ns, step_us from read_parquet(?, hive_partitioning=true) where rank = 2 order by step", glob
    )
    assert np.array_equal(np.array([g[1] for g in got]), expected[2]["ts_ns"][np.argsort(expected[2]["step"])])
    # float columns and other tables too
    cpu = query(
        "select rank, count(*), sum(cpu_pct) from read_parquet(?, hive_partitioning=true) group by rank order by rank",
        str(out / "process" / "**" / "*.parquet"),
    )
    for rank, count, total in cpu:
        assert count == len(process[rank]["ts_ns"])
        assert total == pytest.approx(float(process[rank]["cpu_pct"].astype(np.float64).sum()), rel=1e-9)
    # the run's header in the key-value metadata
    meta = pq.read_metadata(next((out / "step_time" / "rank=0").glob("part-*.parquet"))).metadata
    assert meta[b"traceml.run_id"] == b"alpha-0001"
    assert meta[b"traceml.table"] == b"step_time"
    assert b'"run_name": "alpha"' in meta[b"traceml.header"]


def test_several_runs_share_one_dataset_by_run_partition(tmp_path: Path) -> None:
    a = make_recording(tmp_path / "a.tml", "alpha", ranks=2, steps=500)
    b = make_recording(tmp_path / "b.tml", "beta", ranks=3, steps=300, seed=1)
    out = tmp_path / "pq"
    export(a, out)
    result = export(b, out)
    assert "moved the earlier export of run 'alpha-0001'" in result.output
    assert sorted(p.name for p in (out / "step_time").iterdir()) == ["run=alpha-0001", "run=beta-0001"]
    export(a, out, "--overwrite")  # exporting a run again replaces its files, it does not add its rows twice
    glob = str(out / "step_time" / "**" / "*.parquet")
    rows = query(
        "select run, run_id, count(*), count(distinct rank), max(step) from read_parquet(?, hive_partitioning=true)"
        " group by all order by run",
        glob,
    )
    assert rows == [("alpha-0001", "alpha-0001", 1_000, 2, 499), ("beta-0001", "beta-0001", 900, 3, 299)]
    # the queries of docs/exports.md run as written and answer for both runs
    doc = (Path(__file__).resolve().parents[1] / "docs" / "exports.md").read_text()
    statements = [s for s in re.findall(r"```sql\n(.*?)```", doc, re.S)[0].split(";") if s.strip()]
    assert len(statements) == 3
    history, worst, phases = (
        query(s.replace("runs/", f"{out}/").replace("my-run-0001", "beta-0001").replace("rank = 3", "rank = 2"))
        for s in statements
    )
    assert sorted((h[0], h[3]) for h in history) == [("alpha-0001", 1_000), ("beta-0001", 900)]
    assert [w[0] for w in worst] == ["alpha-0001", "beta-0001"] and all(w[3] >= 1.0 for w in worst)
    assert [p[0] for p in phases] == [0]


def test_bounded_buffers_split_files_and_keep_every_row(tmp_path: Path) -> None:
    src = make_recording(tmp_path / "a.tml", "alpha", ranks=4, steps=3_000, segment_max_bytes=32 << 10)
    with open_recording(src) as reader:
        assert len(reader.segments) > 10
        result = export_parquet(
            reader, tmp_path / "pq", row_group_rows=1_000, max_buffer_bytes=64 << 10, max_open_files=2
        )
        want = {table: sum(len(c["ts_ns"]) for c in reader.read_table(table).values()) for table in reader.tables}
    assert result.rows == want
    parts = list((tmp_path / "pq" / "step_time" / "rank=0").glob("part-*.parquet"))
    assert len(parts) > 1  # a writer closed to stay within two open files reopens as the next part
    assert not list((tmp_path / "pq").rglob("*.tmp"))
    (count,) = query(
        "select count(*) from read_parquet(?, hive_partitioning=true)", str(tmp_path / "pq/step_time/**/*.parquet")
    )[0]
    assert count == want["step_time"] == 12_000


def test_names_from_the_file_never_become_paths_unchecked(tmp_path: Path) -> None:
    src = tmp_path / "odd.tml"
    cols = {"step": np.arange(5, dtype=np.int64), "ts_ns": np.arange(5, dtype=np.int64) + 1}
    write_recording(
        src,
        {0: {"custom/loss": cols, "ok_table": cols}},
        meta={"run_id": "../../run one", "run_name": "x"},
    )
    out = tmp_path / "sub" / "pq"
    with open_recording(src) as reader:
        result = export_parquet(reader, out)
    assert result.rows == {"custom/loss": 5, "ok_table": 5}
    written = [p.resolve() for p in tmp_path.rglob("*.parquet")]
    assert len(written) == 2 and all(out.resolve() in p.parents for p in written)
    directory = table_directory("custom/loss")
    assert "/" not in directory and directory.startswith("custom_loss-")
    assert sorted(p.name for p in out.iterdir()) == sorted([directory, "ok_table"])
    meta = pq.read_metadata(next((out / directory).rglob("part-*.parquet"))).metadata
    assert meta[b"traceml.table"] == b"custom/loss" and meta[b"traceml.run_id"] == b"../../run one"
    # a second run next to it: the unsafe run id becomes a digest partition, the column keeps it
    other = make_recording(tmp_path / "b.tml", "beta", ranks=1, steps=10)
    with open_recording(other) as reader:
        export_parquet(reader, out)
    digest = f"run={run_partition_value('../../run one')}"
    assert [p.name for p in (out / "ok_table").iterdir()] == [digest]  # moved under its run
    assert [p.name for p in (out / "step_time").iterdir()] == ["run=beta-0001"]
    assert run_partition_value("../../run one").startswith("h") and run_partition_value("a-1") == "a-1"
    assert not safe_table_name("a/b") and not safe_table_name("..") and safe_table_name("step_time")


def test_exporting_a_run_again_needs_overwrite(tmp_path: Path) -> None:
    src = make_recording(tmp_path / "a.tml", "alpha", ranks=2, steps=100)
    out = tmp_path / "pq"
    export(src, out)
    before = sorted(p.stat().st_mtime_ns for p in out.rglob("*.parquet"))
    result = runner.invoke(app, ["export", str(src), "--format", "parquet", "-o", str(out)])
    assert result.exit_code == 1
    assert "holds an export of run 'alpha-0001' already" in result.output and "--overwrite" in result.output
    assert sorted(p.stat().st_mtime_ns for p in out.rglob("*.parquet")) == before  # nothing touched
    export(src, out, "--overwrite")
    (count,) = query("select count(*) from read_parquet(?)", str(out / "step_time" / "**" / "*.parquet"))[0]
    assert count == 200


def test_missing_pyarrow_is_a_clear_error_with_the_pip_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_recording(tmp_path / "a.tml", "alpha", ranks=1, steps=10)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with open_recording(src) as reader, pytest.raises(MissingDependencyError, match=r"traceml-recorder\[parquet\]"):
        export_parquet(reader, tmp_path / "pq")
    result = runner.invoke(app, ["export", str(src), "--format", "parquet", "-o", str(tmp_path / "pq")])
    assert result.exit_code == 1
    assert "pip install 'traceml-recorder[parquet]'" in result.output


def test_the_buffer_budget_holds_on_a_long_recording(tmp_path: Path) -> None:
    """What waits to be written stays within ``max_buffer_bytes`` (plus the batch that crossed it)."""
    src = make_recording(tmp_path / "long.tml", "long", ranks=8, steps=25_000, segment_max_bytes=256 << 10)
    budget = 1 << 20
    with open_recording(src) as reader:
        largest = max(seg.raw_size for seg in reader.segments)
        result = export_parquet(reader, tmp_path / "pq", max_buffer_bytes=budget)
    assert result.rows["step_time"] == 200_000
    table_bytes = 200_000 * (10 * 8 + 8 + 4)  # the step rows and the added columns, as arrow holds them
    # the batch that crosses the budget is at most a segment's rows, plus the added columns
    assert result.peak_buffered_bytes <= budget + 4 * largest < table_bytes // 4
