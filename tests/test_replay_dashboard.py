"""The dashboard's sources over recordings: staged loading (step charts first) and follow mode."""

from __future__ import annotations

from pathlib import Path

import pytest

import replay
from replay.dashboard import FollowSource, RecordingSource, build_dashboard
from traceml.format import TmlWriter
from traceml.testing.synthetic import run_meta, synthetic_run, write_recording


@pytest.fixture(scope="module")
def tml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "run.tml"
    write_recording(path, synthetic_run(ranks=2, steps=2000, gpu=True, seed=3), chunk_steps=500)
    return path


def test_staged_source_serves_the_step_table_first_then_everything(tml: Path) -> None:
    with replay.open(tml, progress=False) as rec:
        source = RecordingSource(rec)
        try:
            first = source.first_view
            assert first.table_names() == ["step_time"]
            assert first.meta["run_name"] == "synthetic" and first.rank_info.keys() == {0, 1}
            assert first.total_rows() == 4000
            assert source.loading() and source() is first  # the rest waits for the first charts
            source.load_rest()
            source.load_rest()  # once
        finally:
            source.close()
        assert not source.loading() and not source.error
        final = source()
        assert (
            final.table_names()
            == rec.tables
            == sorted(["step_time", "step_gpu", "step_memory", "process", "system", "system_gpu"])
        )
        assert final.total_rows() == sum(rec.rows.values())
        assert final is rec.view()


def test_unstaged_source_loads_everything_first(tml: Path) -> None:
    with replay.open(tml, progress=False) as rec:
        source = RecordingSource(rec, staged=False)
        assert not source.loading()
        assert source().table_names() == rec.tables
        assert source() is source()


def test_build_dashboard_closes_what_it_opened(tml: Path, tmp_path: Path) -> None:
    app, close = build_dashboard(tml, compare=tml)
    close()
    assert app.title.startswith("traceml")
    with pytest.raises(replay.engine.ReplayError, match="not found"):
        build_dashboard(tmp_path / "missing.tml")


def test_follow_source_polls_the_growing_file(tmp_path: Path) -> None:
    path = tmp_path / "growing.tml"
    run = synthetic_run(ranks=1, steps=300, seed=4)
    cols = run[0]["step_time"]
    with TmlWriter(path, run_meta=run_meta(ranks=1), segment_max_bytes=1024, fsync_interval_s=None) as writer:
        writer.append(0, "step_time", {k: v[:100] for k, v in cols.items()})
        writer.tick()
        with replay.open(path, follow=True, progress=False) as rec:
            source = FollowSource(rec)
            before = source().rows("step_time", 0)
            assert 0 < before <= 100 and source().meta["status"] == "running"
            writer.append(0, "step_time", {k: v[100:] for k, v in cols.items()})
            writer.attach("exit", {"exit_code": 0, "status": "ok", "duration_s": 1.0, "signal": ""})
            writer.close()
            after = source()
            assert after.rows("step_time", 0) == 300
            assert after.meta["status"] == "finished" and after.integrity["status"] == "complete"
            assert source() is after  # finished: no more polling
