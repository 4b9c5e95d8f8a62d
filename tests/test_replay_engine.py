"""replay.open on real .tml files written by TmlWriter: index seeking, the StoreView, integrity of
crashed / truncated / damaged files, follow mode, progress, and no torch on the path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import replay
from traceml.errors import FormatError, NotATmlFileError, ReplayError
from traceml.format import TmlWriter
from traceml.store import StoreView
from traceml.testing.synthetic import rank_infos, run_meta, store_from_run, synthetic_run, write_recording

EXIT = {"exit_code": 0, "status": "ok", "duration_s": 9.5, "signal": ""}


def env_doc(rank: int) -> dict:
    return {
        "rank": rank,
        "local_rank": rank,
        "node_rank": 0,
        "host": f"host{rank}",
        "pid": 4000 + rank,
        "python": "3.11",
    }


@pytest.fixture(scope="module")
def run():
    return synthetic_run(ranks=3, steps=3000, gpu=True, slow_rank=2, seed=11, sample_every=25)


@pytest.fixture(scope="module")
def tml(run, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rec") / "run.tml"
    attachments = {f"environment/rank{r}": env_doc(r) for r in run}
    attachments |= {"ranks": {"ranks": rank_infos(run)}, "exit": EXIT, "summary": {"schema_version": 1}}
    write_recording(path, run, attachments=attachments, chunk_steps=250, segment_max_bytes=64 << 10)
    return path


def same_columns(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


# --- a clean recording ------------------------------------------------------------------------


def test_open_reads_metadata_ranks_tables_and_rows_from_the_index(tml: Path, run) -> None:
    with replay.open(tml) as rec:
        assert rec.ranks == [0, 1, 2]
        assert rec.tables == sorted({t for tables in run.values() for t in tables})
        assert rec.rows["step_time"] == 9000
        assert rec.integrity["status"] == "complete"
        meta = rec.meta
        assert meta["run_name"] == "synthetic" and meta["status"] == "finished"
        assert meta["recording_path"] == str(tml) and meta["recording_bytes"] == tml.stat().st_size
        assert rec.start_ns == meta["start_ns"]
        assert len(rec.segments) > 10
        assert "Recording(" in repr(rec)


def test_columns_by_table_and_rank_equal_what_was_written(tml: Path, run) -> None:
    with replay.open(tml) as rec:
        assert same_columns(rec.columns("step_time", 1), run[1]["step_time"])
        by_rank = rec.columns("process")
        assert sorted(by_rank) == [0, 1, 2]
        assert same_columns(by_rank[2], run[2]["process"])
        assert same_columns(rec.columns("system", 0), run[0]["system"])
        assert rec.columns("system", 1)["ts_ns"].shape == (0,)  # only the node's first rank samples the system
        with pytest.raises(ReplayError, match="no table 'nope'"):
            rec.columns("nope")


def test_step_and_time_bounds_are_inclusive_and_exact(tml: Path, run) -> None:
    with replay.open(tml) as rec:
        cols = rec.columns("step_time", 0, steps=(1200, 1299))
        assert cols["step"].tolist() == list(range(1200, 1300))
        assert same_columns(cols, {k: v[1200:1300] for k, v in run[0]["step_time"].items()})
        ts = run[1]["process"]["ts_ns"]
        t0, t1 = int(ts[10]), int(ts[20])
        part = rec.columns("process", 1, time=(t0, t1))
        assert part["ts_ns"].tolist() == ts[10:21].tolist()
        both = rec.columns("step_memory", None, steps=(10, None), time=(None, int(run[0]["step_time"]["ts_ns"][19])))
        assert both[0]["step"].tolist() == list(range(10, 20))
        rec.load(["step_time"])  # the same answers from memory
        assert rec.columns("step_time", 0, steps=(1200, 1299))["step"].tolist() == list(range(1200, 1300))


def test_a_step_range_seeks_through_the_index_without_reading_other_segments(tml: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.tml"
    shutil.copy(tml, damaged)
    with replay.open(damaged) as rec:
        last = max((s for s in rec.segments if "step_time" in s.tables), key=lambda s: s.offset)
        assert last.step_min is not None and last.step_min > 100
    with open(damaged, "r+b") as fh:  # break the last step segment's payload
        fh.seek(last.offset + last.length // 2)
        byte = fh.read(1)
        fh.seek(last.offset + last.length // 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with replay.open(damaged) as rec:
        early = rec.columns("step_time", 0, steps=(0, 99))
        assert early["step"].tolist() == list(range(100))
        assert rec.integrity["status"] == "complete"  # the broken segment was never read
        view = rec.view()
        integrity = rec.integrity
    assert integrity["status"] == "damaged"
    assert [s["offset"] for s in integrity["skipped"]] == [last.offset]
    assert integrity["lost_bytes"] == last.length and "SEGMENT" in integrity["message"]
    assert view.integrity == integrity
    lost = sum(n for (_, t), n in last.rows.items() if t == "step_time")
    assert view.total_rows("step_time") == 9000 - lost


def test_view_is_the_store_view_the_aggregator_fills(tml: Path, run) -> None:
    with replay.open(tml) as rec:
        view = rec.view()
        assert rec.view() is view  # loaded once
    assert isinstance(view, StoreView)
    live = store_from_run(run).snapshot()
    assert set(view.tables) == set(live.tables)
    for key in live.tables:
        assert same_columns(dict(view.tables[key]), dict(live.tables[key])), key
    assert view.evicted == {} and view.latest_ns == live.latest_ns
    assert view.rank_info[1].state == "finished" and view.rank_info[1].exit_status == "ok"
    assert view.rank_info[2].host == "node0"
    assert view.attachments["exit"] == EXIT and view.attachments["environment/rank1"]["host"] == "host1"
    assert view.integrity is not None and view.integrity["status"] == "complete"
    assert view.meta["status"] == "finished"


def test_parallel_and_sequential_loads_agree(tml: Path) -> None:
    with replay.open(tml, workers=1) as one, replay.open(tml, workers=3) as three:
        a, b = one.view(), three.view()
    assert a.tables.keys() == b.tables.keys()
    assert all(same_columns(dict(a.tables[k]), dict(b.tables[k])) for k in a.tables)


def test_progress_bar_on_stderr_only_when_wanted(tml: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with replay.open(tml, progress=True) as rec:
        rec.load()
    assert "loading run.tml" in capsys.readouterr().err
    with replay.open(tml, progress=False) as rec:
        rec.load()
    assert capsys.readouterr().err == ""


# --- crashed, truncated, damaged, not a recording ------------------------------------------------


def test_a_crashed_writer_leaves_a_readable_recording(run, tmp_path: Path) -> None:
    live = tmp_path / "live.tml"
    crashed = tmp_path / "crashed.tml"
    attachments = {f"environment/rank{r}": env_doc(r) for r in run}
    writer = write_recording(
        live, run, attachments=attachments, chunk_steps=200, segment_max_bytes=16 << 10, close=False
    )
    try:
        shutil.copy(live, crashed)  # what is on disk when the writer is killed: no footer, no end attachments
    finally:
        writer.close()
    with replay.open(crashed) as rec:
        view = rec.view()
        integrity = rec.integrity
    assert integrity["status"] == "recovered" and "did not finish" in integrity["message"]
    rows = view.total_rows("step_time")
    assert 0 < rows <= 9000
    steps = view.columns("step_time", 0)["step"]
    assert steps.tolist() == list(range(len(steps)))  # a prefix, in order
    assert view.meta["status"] == "incomplete"
    assert view.rank_info[1].state == "unknown" and view.rank_info[1].host == "host1"
    newest = max(int(view.columns(t, 1)["ts_ns"].max()) for t in view.table_names() if view.rows(t, 1))
    assert view.rank_info[1].last_seen_ns == newest
    assert "exit" not in view.attachments


@pytest.mark.parametrize("cut", [0.999, 0.75, 0.5, 0.1])
def test_truncated_files_return_what_is_readable_and_say_what_was_lost(tml: Path, tmp_path: Path, cut: float) -> None:
    data = tml.read_bytes()
    short = tmp_path / "short.tml"
    short.write_bytes(data[: int(len(data) * cut)])
    with replay.open(short) as rec:
        view = rec.view()
        integrity = rec.integrity
    assert integrity["status"] in ("recovered", "damaged")
    assert integrity["lost_bytes"] > 0 and integrity["message"]
    for r in view.table_ranks("step_time"):
        steps = view.columns("step_time", r)["step"]
        assert steps.tolist() == list(range(len(steps)))
    if cut <= 0.75:
        assert view.total_rows("step_time") < 9000
    assert view.meta["status"] in ("incomplete", "finished")  # "finished" when the exit attachment survived


def test_a_file_cut_inside_its_header_cannot_be_opened(tml: Path, tmp_path: Path) -> None:
    stub = tmp_path / "stub.tml"
    stub.write_bytes(tml.read_bytes()[:20])
    with pytest.raises(FormatError):
        replay.open(stub)


def test_flipped_bytes_are_skipped_and_reported(tml: Path, tmp_path: Path) -> None:
    data = bytearray(tml.read_bytes())
    rng = np.random.default_rng(2)
    for at in rng.integers(2000, len(data) - 2000, 5):
        data[int(at)] ^= 0x5A
    bad = tmp_path / "bad.tml"
    bad.write_bytes(bytes(data))
    with replay.open(bad) as rec:
        view = rec.view()
        integrity = rec.integrity
    assert integrity["status"] == "damaged"
    assert len(integrity["skipped"]) >= 1 and all(s["reason"] for s in integrity["skipped"])
    assert 0 < view.total_rows("step_time") < 9000


def test_not_a_recording(tmp_path: Path) -> None:
    text = tmp_path / "notes.tml"
    text.write_text("hello, not a recording\n" * 10)
    with pytest.raises(NotATmlFileError):
        replay.open(text)
    with pytest.raises(ReplayError, match="not found"):
        replay.open(tmp_path / "missing.tml")
    with pytest.raises(ReplayError, match="directory"):
        replay.open(tmp_path)


# --- follow mode ----------------------------------------------------------------------------------


def test_follow_polls_new_rows_until_the_footer(tmp_path: Path) -> None:
    path = tmp_path / "growing.tml"
    run = synthetic_run(ranks=2, steps=400, seed=4)
    writer = TmlWriter(path, run_meta=run_meta(ranks=2), segment_max_bytes=2048, fsync_interval_s=None)
    try:
        for r in run:
            writer.append(r, "step_time", {k: v[:100] for k, v in run[r]["step_time"].items()})
        writer.tick()
        with replay.open(path, follow=True) as rec:
            first = rec.view().total_rows("step_time")
            assert 0 < first <= 200 and not rec.finished and rec.meta["status"] == "running"
            for r in run:
                writer.append(r, "step_time", {k: v[100:] for k, v in run[r]["step_time"].items()})
            writer.attach("exit", EXIT)
            writer.close()
            new = rec.poll()
            assert rec.finished and rec.meta["status"] == "finished"
            assert sum(len(c["step"]) for _, t, c in new if t == "step_time") == 800 - first
            assert rec.view().total_rows("step_time") == 800
            assert rec.integrity["status"] == "complete"
    finally:
        writer.close()


# --- no torch -----------------------------------------------------------------------------------


def test_the_replay_path_never_imports_torch_or_dash(tml: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now raises ImportError
        import replay
        from replay.player import Playback
        from traceml.cli import app
        rec = replay.open({str(tml)!r})
        view = rec.view()
        assert view.total_rows("step_time") == 9000
        assert rec.columns("step_time", 0, steps=(5, 9))["step"].tolist() == [5, 6, 7, 8, 9]
        end = Playback(rec).finish()
        assert end.total_rows() == view.total_rows()
        rec.close()
        assert "dash" not in sys.modules, "replay.open must not import dash"
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
