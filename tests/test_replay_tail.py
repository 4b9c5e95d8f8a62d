"""replay.tail.Tail: the one tail behind ``replay --follow`` and the dashboard's follow source."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

import replay
from replay.bounded import ENV_ROW_BUDGET
from replay.player import Playback
from replay.tail import Tail
from traceml.diagnosis.summary import build_summary
from traceml.format import TmlWriter
from traceml.testing.synthetic import run_meta, synthetic_run


def test_a_tail_grows_with_the_file_and_freezes_on_its_end_state(tmp_path: Path) -> None:
    path = tmp_path / "growing.tml"
    run = synthetic_run(ranks=2, steps=200, seed=5)
    with TmlWriter(path, run_meta=run_meta(ranks=2), segment_max_bytes=1024, fsync_interval_s=None) as writer:
        writer.append(0, "step_time", {k: v[:50] for k, v in run[0]["step_time"].items()})
        writer.tick()
        with replay.open(path, follow=True, progress=False) as rec:
            tail = Tail(rec)
            first = tail.poll()
            assert not tail.finished and first.meta["status"] == "running"
            writer.append(0, "step_time", {k: v[50:] for k, v in run[0]["step_time"].items()})
            writer.append(1, "step_time", run[1]["step_time"])
            writer.tick()
            grown = tail.poll()
            assert grown.total_rows() > first.total_rows() and grown.rows("step_time", 1) > 0
            assert grown.rank_info[1].state == "connected"  # a rank that appears while tailing
            stopped = tail.finish()  # a tail stopped before the footer: the rows, not frozen
            assert stopped.meta["status"] == "running" and tail.poll() is not stopped
            writer.attach("exit", {"exit_code": 0, "status": "ok", "duration_s": 1.0, "signal": ""})
            writer.close()
            end = tail.poll()
            assert tail.finished and end.meta["status"] == "finished" and "exit" in end.attachments
            assert end.integrity["status"] == "complete" and end.total_rows() == 400
            # no ranks document in this file: its unknown state does not replace a rank seen connecting
            assert end.rank_info[1].state == "connected" and end.rank_info[0].state == "unknown"
            assert tail.poll() is end and tail.finish() is end


# --- bounded follow ---------------------------------------------------------------------------

BUDGET = 10_000  # the smallest budget allowed, against ~50,000 rows in the followed file
RANKS, STEPS, CHUNK = 4, 10_000, 250


def _write_growing(path: Path, run: dict, wrote: list[int], go: threading.Event | None = None) -> None:
    """The writer of a run: ``CHUNK`` steps of every table at a time (``write_recording``'s slicing),
    each made readable by ``tick``; ``wrote`` counts the rows written."""
    with TmlWriter(path, run_meta=run_meta(ranks=RANKS), segment_max_bytes=1 << 15, fsync_interval_s=None) as w:
        for a in range(0, STEPS, CHUNK):
            for r, tables in sorted(run.items()):
                for name, cols in tables.items():
                    n = len(cols["ts_ns"])
                    lo, hi = a * n // STEPS, (a + CHUNK) * n // STEPS
                    if hi > lo:
                        w.append(r, name, {c: v[lo:hi] for c, v in cols.items()})
                        wrote[0] += hi - lo
            w.tick()
            if go is not None:
                go.wait(10)
                go.clear()
        w.attach("exit", {"exit_code": 0, "status": "ok", "duration_s": 1.0, "signal": ""})


def _stats(summary: dict) -> dict:
    """The summary less what describes the file rather than the rows (its size grows as it is written)."""
    return {k: v for k, v in summary.items() if k not in ("recording", "integrity")}


@pytest.fixture(scope="module")
def run() -> dict:
    return synthetic_run(ranks=RANKS, steps=STEPS, seed=7, slow_rank=2)


def test_a_followed_file_past_the_budget_is_held_in_bounded_memory(tmp_path: Path, run: dict) -> None:
    path = tmp_path / "long.tml"
    wrote = [0]
    go = threading.Event()
    writer = threading.Thread(target=_write_growing, args=(path, run, wrote, go))
    held: list[int] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_ROW_BUDGET, str(BUDGET))
        writer.start()
        try:
            while not path.exists() or path.stat().st_size == 0:
                time.sleep(0.01)
            with replay.open(path, follow=True, progress=False) as rec:
                tail = Tail(rec)
                tail.REBUILD_FACTOR = 0.0  # every poll rebuilds the view
                assert tail.budget == BUDGET
                while not tail.finished:
                    go.set()
                    view = tail.poll()
                    if tail.finished:
                        break
                    held.append(tail.held())
                    assert view.total_rows() <= tail.held() <= BUDGET
                    if tail.bounded:
                        totals = view.digests["step_time"]
                        assert view.meta["status"] == "running"
                        # every row read so far is counted, though most were let go
                        assert totals.recorded_rows == rec.rows["step_time"] > view.total_rows("step_time")
                    time.sleep(0.005)
                end = tail.poll()
        finally:
            go.set()
            writer.join(30)
    assert not writer.is_alive()
    assert wrote[0] > 4 * BUDGET and tail.bounded is False  # the end view replaced the builder
    assert max(held) <= BUDGET and len(held) > 5
    with replay.open(path, progress=False) as rec:
        expected = rec.bounded_view(BUDGET)
        played = Playback(rec, row_budget=BUDGET).finish()
    # the end state is the file's own bounded view (its plan holds about the budget)
    assert end.total_rows() == expected.total_rows() <= 1.1 * BUDGET and "step_time" in end.digests
    assert end.meta["status"] == "finished" and "exit" in end.attachments
    assert end.digests["step_time"].recorded_rows == RANKS * STEPS
    assert _stats(build_summary(end)) == _stats(build_summary(expected)) == _stats(build_summary(played))


def test_the_view_while_following_has_the_statistics_replay_shows_of_the_file_so_far(tmp_path: Path, run: dict) -> None:
    path = tmp_path / "growing.tml"
    half = STEPS // 2
    with TmlWriter(path, run_meta=run_meta(ranks=RANKS), segment_max_bytes=1 << 15, fsync_interval_s=None) as w:
        w.append(0, "step_time", {k: v[:100] for k, v in run[0]["step_time"].items()})
        w.tick()
        with replay.open(path, follow=True, progress=False) as rec:
            tail = Tail(rec, budget=BUDGET)
            tail.REBUILD_FACTOR = 0.0  # every poll rebuilds the view
            assert not tail.bounded  # within the budget: every row, as replay holds them
            for a in range(0, half, CHUNK):
                for r in range(RANKS):
                    lo = max(a, 100) if r == 0 else a
                    w.append(r, "step_time", {k: v[lo : a + CHUNK] for k, v in run[r]["step_time"].items()})
                w.tick()
                view = tail.poll()
                assert tail.held() <= BUDGET
            assert tail.bounded and view.digests["step_time"].recorded_rows == rec.rows["step_time"] > BUDGET
            with replay.open(path, progress=False) as so_far:
                want = build_summary(so_far.bounded_view(BUDGET))
                so_far_last = {r: so_far.columns("step_time", r)["step"].max() for r in range(RANKS)}
            got = build_summary(view)
            # counts, sums and sketched quantiles are those of one pass over the same rows; the
            # skew and regions come from the held sample, whose stride the tail doubled as it grew
            for key in ("count", "recorded_rows", "failed_rows", "warmup_steps", "first", "last", "common_steps"):
                assert got["steps"][key] == want["steps"][key], key
            for key in ("throughput_steps_per_s", "elapsed_s", "outside_step_share"):
                assert got["steps"][key] == pytest.approx(want["steps"][key], rel=1e-9), key
            for part, stats in want["steps"]["overall"].items():
                for key in ("median_ms", "p95_ms", "mean_ms", "share"):
                    if stats.get(key) is not None:
                        assert got["steps"]["overall"][part][key] == pytest.approx(stats[key], rel=1e-9), (part, key)
            assert got["steps"]["slowest_rank"] == want["steps"]["slowest_rank"] == 2
            # the live view's window (each rank's last steps) is held whole
            for r in range(RANKS):
                last = int(so_far_last[r])
                assert np.array_equal(view.columns("step_time", r)["step"][-128:], np.arange(last - 127, last + 1))


def test_dashboard_follow_source_is_bounded_too(tmp_path: Path, run: dict) -> None:
    from replay.dashboard import FollowSource

    path = tmp_path / "dash.tml"
    wrote = [0]
    writer = threading.Thread(target=_write_growing, args=(path, run, wrote))
    writer.start()
    writer.join(60)
    with replay.open(path, follow=True, progress=False) as rec:
        # a file already past the budget when the follow starts: read once into the bounded builder
        src = FollowSource(rec, row_budget=BUDGET)
        view = src()
        assert view.total_rows() <= 1.1 * BUDGET and view.meta["status"] == "finished"
    with replay.open(path, progress=False) as rec:
        assert _stats(build_summary(view)) == _stats(build_summary(rec.bounded_view(BUDGET)))


def test_past_the_budget_a_poll_rebuilds_the_view_only_after_ten_times_its_build_time(
    tmp_path: Path, run: dict
) -> None:
    path = tmp_path / "throttled.tml"
    now = [0.0]
    with TmlWriter(path, run_meta=run_meta(ranks=RANKS), segment_max_bytes=1 << 15, fsync_interval_s=None) as w:
        for r in range(RANKS):
            w.append(r, "step_time", {k: v[:4_000] for k, v in run[r]["step_time"].items()})
        w.tick()
        with replay.open(path, follow=True, progress=False) as rec:
            tail = Tail(rec, budget=BUDGET, clock=lambda: now[0])
            first = tail.poll()
            assert tail.bounded and tail.latest() is first
            for r in range(RANKS):
                w.append(r, "step_time", {k: v[4_000:6_000] for k, v in run[r]["step_time"].items()})
            w.tick()
            # no time went by: the new rows are folded into the totals, the view shown is the last one
            assert tail.poll() is first and tail.latest() is first
            now[0] += 1.0  # far more than ten builds of a view this small
            rebuilt = tail.poll()
            assert rebuilt is not first
            assert rebuilt.digests["step_time"].recorded_rows == rec.rows["step_time"]
            assert rebuilt.digests["step_time"].recorded_rows > first.digests["step_time"].recorded_rows


def test_dashboard_follow_of_a_growing_file_stays_within_the_budget(tmp_path: Path, run: dict) -> None:
    from replay.dashboard import FollowSource
    from traceml.views import step_source

    path = tmp_path / "dash_growing.tml"
    with TmlWriter(path, run_meta=run_meta(ranks=RANKS), segment_max_bytes=1 << 15, fsync_interval_s=None) as w:
        w.append(0, "step_time", {k: v[:10] for k, v in run[0]["step_time"].items()})
        w.tick()
        with replay.open(path, follow=True, progress=False) as rec:
            src = FollowSource(rec, row_budget=BUDGET)
            src._tail.REBUILD_FACTOR = 0.0  # every call shows the rows so far
            for a in range(0, STEPS, 1_000):
                for r in range(RANKS):
                    lo = max(a, 10) if r == 0 else a
                    w.append(r, "step_time", {k: v[lo : a + 1_000] for k, v in run[r]["step_time"].items()})
                w.tick()
                view = src()
                assert view.total_rows() <= BUDGET
            assert view.digests["step_time"].recorded_rows == rec.rows["step_time"] > 3 * BUDGET
            # the dashboard's step charts count every step read so far (the bounded read's step source)
            src_steps = step_source(view)
            assert sum(src_steps.count(r) for r in src_steps.per_rank()) == rec.rows["step_time"]
