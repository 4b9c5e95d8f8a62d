"""The step charts drawn from a recording's rollup agree with the same charts drawn from every row."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import replay
from replay import dashboard
from traceml import views as tv
from traceml.store import StoreView
from traceml.testing.synthetic import run_meta, synthetic_run, write_recording

GROUPS = 400  # of 256 steps: buckets of one group at 400 buckets, so both paths bucket alike
STEPS = 256 * GROUPS


@pytest.fixture(scope="module")
def views(tmp_path_factory: pytest.TempPathFactory) -> tuple[StoreView, StoreView]:
    """(rollup-only view, every-row view) of one 3-rank recording with a straggler."""
    path = tmp_path_factory.mktemp("rollup") / "run.tml"
    run = synthetic_run(ranks=3, steps=STEPS, slow_rank=1, seed=5, sample_every=1000)
    write_recording(path, run, meta=run_meta("rollup", ranks=3), chunk_steps=7_000)
    with replay.open(path, progress=False) as rec:
        return rec.rollup_store(["step_time"]).snapshot(), rec.view()


def test_breakdown_means_are_exact_and_quantiles_wait_for_the_rows(views: tuple[StoreView, StoreView]) -> None:
    rolled, full = views
    a = tv.step_breakdown(rolled, max_buckets=GROUPS)
    b = tv.step_breakdown(full, max_buckets=GROUPS)
    assert not a.exact and b.exact
    assert a.bucket_steps == b.bucket_steps == 256 and a.rows == b.rows == 3 * STEPS
    np.testing.assert_allclose(a.steps, b.steps)
    np.testing.assert_allclose(a.total_ms, b.total_ms, rtol=1e-12)
    for phase in b.phases:
        np.testing.assert_allclose(a.phases[phase], b.phases[phase], rtol=1e-12)
    assert math.isnan(a.median_ms) and math.isnan(a.p95_ms) and b.median_ms > 0
    # coarser buckets than a group: whole groups per bucket, means still weighted by rows
    coarse = tv.step_breakdown(rolled, max_buckets=GROUPS // 8)
    assert coarse.bucket_steps == 256 * 8
    np.testing.assert_allclose(coarse.total_ms[0], b.total_ms[:8].mean(), rtol=1e-12)


def test_rank_lines_envelope_every_step_and_the_straggler_shows(views: tuple[StoreView, StoreView]) -> None:
    rolled, full = views
    a = tv.rank_steps(rolled, max_points=2 * GROUPS, heat_buckets=GROUPS)
    b = tv.rank_steps(full, max_points=2 * GROUPS, heat_buckets=GROUPS)
    assert not a.exact and a.slowest_rank == b.slowest_rank == 1
    np.testing.assert_allclose(a.heat_ms, b.heat_ms, rtol=1e-12)
    for ta, sa, sb in zip(a.traces, a.stats, b.stats, strict=True):
        raw = full.columns("step_time", ta.rank or 0)["step_us"] / 1000.0
        assert ta.points == sb.steps == STEPS and len(ta.x) <= 2 * GROUPS
        assert np.nanmin(ta.y) == raw.min() and np.nanmax(ta.y) == raw.max()
        assert sa.mean_ms == pytest.approx(raw.mean(), rel=1e-12)
        assert math.isnan(sa.median_ms) and sb.median_ms > 0
    assert a.skew_pct > 0 and math.isfinite(a.skew_pct)
    few = tv.rank_steps(rolled, max_points=100)
    assert all(len(t.x) <= 100 for t in few.traces)


def test_ranges_time_and_throughput_follow_the_rows(views: tuple[StoreView, StoreView]) -> None:
    rolled, full = views
    assert tv.step_range_of(rolled) == tv.step_range_of(full) == (0, STEPS - 1)
    lo, hi = 256 * 10, 256 * 20 - 1  # whole groups: the same steps either way
    assert tv.step_range_to_time(rolled, (lo, hi)) == pytest.approx(tv.step_range_to_time(full, (lo, hi)), abs=0.05)
    zoom = tv.step_breakdown(rolled, step_range=(lo, hi))
    assert zoom.rows == 3 * (hi - lo + 1)
    ta, tb = tv.throughput(rolled), tv.throughput(full)
    assert ta.steps == tb.steps == STEPS
    assert ta.mean_steps_per_s == pytest.approx(tb.mean_steps_per_s, rel=0.01)
    assert np.nanmedian(ta.steps_per_s) == pytest.approx(np.nanmedian(tb.steps_per_s), rel=0.1)


def test_the_run_panel_counts_steps_and_duration_from_the_rollup(views: tuple[StoreView, StoreView]) -> None:
    rolled, full = views
    a, b = tv.run_info(rolled), tv.run_info(full)
    assert a.ranks == b.ranks and all(row[4] == str(STEPS) for row in a.ranks)
    assert dict(a.meta)["duration"] == dict(b.meta)["duration"]


def test_a_long_recording_draws_from_its_rollup_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "long.tml"
    write_recording(path, synthetic_run(ranks=2, steps=3000), meta=run_meta("long", ranks=2))
    monkeypatch.setattr(dashboard, "ROLLUP_FIRST_ROWS", 1000)
    with replay.open(path, progress=False) as rec:
        source = dashboard.RecordingSource(rec)
        try:
            first = source()
            assert source.loading() and first.table_names() == ["rollup/step_time"]
            assert not tv.step_breakdown(first).exact
            source.load_rest()
            source.close()  # joins the loader
            assert not source.loading() and tv.step_breakdown(source()).exact
            assert source().has("process")
        finally:
            source.close()
    monkeypatch.setattr(dashboard, "ROLLUP_FIRST_ROWS", 10_000)
    with replay.open(path, progress=False) as rec:
        source = dashboard.RecordingSource(rec)
        assert source().has("step_time") and not source().has("rollup/step_time")
        source.load_rest()
        source.close()
