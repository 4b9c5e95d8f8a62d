"""Bounded reading of long recordings: the row budget holds, the figures stay exact or within 1%.

A recording whose rows fit the budget gives the very same summary as the whole-row view; one
beyond it is read into a sample of at most the budget's rows plus exact totals and sketches.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import replay
from replay.bounded import ENV_ROW_BUDGET, MIN_ROW_BUDGET, row_budget
from traceml.diagnosis.summary import build_summary
from traceml.errors import ConfigError
from traceml.testing.synthetic import synthetic_run, write_recording
from traceml.views.bounded import StepDigest
from traceml.views.measures import job_measures
from traceml.views.steps import job_series, step_data

RANKS = 4
STEPS = 6_000
BUDGET = MIN_ROW_BUDGET  # 10,000 rows against ~25,000 in the file


@pytest.fixture(scope="module")
def long_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bounded") / "long.tml"
    run = synthetic_run(ranks=RANKS, steps=STEPS, seed=3, slow_rank=1)
    write_recording(path, run, chunk_steps=500, segment_max_bytes=1 << 15)
    return path


def _order_stat(values: np.ndarray, q: float) -> float:
    v = np.sort(values[np.isfinite(values)])
    return float(v[int(math.floor(q * (len(v) - 1)))])


def test_view_holds_at_most_the_row_budget(long_run: Path) -> None:
    with replay.open(long_run) as rec:
        assert sum(rec.rows.values()) > 2 * BUDGET
        view = rec.bounded_view(BUDGET)
    assert view.total_rows() <= BUDGET
    assert "step_time" in view.digests
    # every rank keeps its last steps whole (the recent diagnosis reads them)
    for r in range(RANKS):
        steps = view.columns("step_time", r)["step"]
        assert np.array_equal(steps[-128:], np.arange(STEPS - 128, STEPS))


def test_counts_and_sums_are_exact_quantiles_within_one_percent(long_run: Path) -> None:
    with replay.open(long_run) as rec:
        full = rec.view()
        bounded = rec.bounded_view(BUDGET)
    exact, approx = build_summary(full), build_summary(bounded)
    es, bs = exact["steps"], approx["steps"]
    for key in (
        "count",
        "recorded_rows",
        "failed_rows",
        "warmup_steps",
        "first",
        "last",
        "common_steps",
        "slowest_rank",
    ):
        assert bs[key] == es[key], key
    for key in ("throughput_steps_per_s", "elapsed_s", "outside_step_share"):
        assert bs[key] == pytest.approx(es[key], rel=1e-6), key
    for part, stats in es["overall"].items():
        if stats.get("share") is not None:
            assert bs["overall"][part]["share"] == pytest.approx(stats["share"], rel=1e-6)
            assert bs["overall"][part]["mean_ms"] == pytest.approx(stats["mean_ms"], rel=1e-6)
    # medians and p95 against the order statistics of every row
    data = step_data(full)
    job = job_series(data)
    for part in ("step", "forward", "backward"):
        for q, key in ((0.5, "median_ms"), (0.95, "p95_ms")):
            want = _order_stat(job[part], q) / 1000
            assert bs["overall"][part][key] == pytest.approx(want, rel=0.01), (part, key)
    for row in bs["per_rank"]:
        rs = data.per_rank[row["rank"]]
        assert row["count"] == len(rs)
        assert row["phases"]["step"]["median_ms"] == pytest.approx(_order_stat(rs.step_us, 0.5) / 1000, rel=0.01)
    # the verdict is the same: rank 1 is the straggler
    assert approx["diagnosis"]["primary"]["kind"] == exact["diagnosis"]["primary"]["kind"]
    assert approx["diagnosis"]["primary"]["rank"] == exact["diagnosis"]["primary"]["rank"] == 1
    assert approx["diagnosis_recent"] == exact["diagnosis_recent"]  # the tail is held whole


def test_a_file_within_the_budget_gives_the_same_summary(long_run: Path) -> None:
    with replay.open(long_run) as rec:
        whole = json.dumps(build_summary(rec.view()), sort_keys=True)
    with replay.open(long_run) as rec:
        view = rec.bounded_view(10 * BUDGET)
        assert not view.digests
        assert json.dumps(build_summary(view), sort_keys=True) == whole


def test_digest_of_batches_out_of_order_matches_the_whole_rows() -> None:
    run = synthetic_run(ranks=3, steps=900, seed=5)
    digest = StepDigest([0, 1, 2], warmup_below=5, warmup_steps=5, stride=7)
    # rank 2 lags: its batches come two chunks late, in a different chunking
    order = [(r, a) for a in range(0, 900, 100) for r in (0, 1)] + [(2, a) for a in range(0, 900, 150)]
    for r, a in order:
        size = 150 if r == 2 else 100
        digest.add(r, {k: v[a : a + size] for k, v in run[r]["step_time"].items()})
    t = digest.finish()
    from traceml.testing.synthetic import store_from_run

    data = step_data(store_from_run(run).snapshot())
    m = job_measures(data)
    assert (t.steps, t.common_steps, t.first_step, t.last_step) == (895, 895, 5, 899)
    assert t.job_step_common.count == 895
    assert sum(rt.step_sum_us for rt in t.per_rank.values()) / sum(rt.steps for rt in t.per_rank.values()) == (
        pytest.approx(m.mean_step_us, rel=1e-9)
    )
    assert t.job_step_common.quantile(0.5) == pytest.approx(_order_stat(job_series(data)["step"], 0.5), rel=0.01)
    assert digest.pending == 0


def test_row_budget_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_ROW_BUDGET, raising=False)
    assert row_budget() == 1_000_000
    monkeypatch.setenv(ENV_ROW_BUDGET, "2_000_000")
    assert row_budget() == 2_000_000
    monkeypatch.setenv(ENV_ROW_BUDGET, "lots")
    with pytest.raises(ConfigError, match=ENV_ROW_BUDGET):
        row_budget()
    with pytest.raises(ConfigError, match="at least"):
        row_budget(10)


def test_compare_reads_a_bounded_recording_with_the_same_figures(long_run: Path) -> None:
    from replay.compare_input import side_from_view

    with replay.open(long_run) as rec:
        exact = side_from_view(rec.view())
        approx = side_from_view(rec.bounded_view(BUDGET))
    assert approx.steps < exact.steps  # the sample
    for r in range(RANKS):
        # steps over the wall time they took: the sample's cycles stand for the steps between them
        e = exact.series[f"cycle@{r}"]
        a = approx.series[f"cycle@{r}"]
        assert np.nanmean(a) == pytest.approx(np.nanmean(e), rel=0.01)
        e_out = np.nansum(exact.series[f"outside@{r}"]) / np.nansum(e)
        a_out = np.nansum(approx.series[f"outside@{r}"]) / np.nansum(a)
        assert a_out == pytest.approx(e_out, abs=0.02)
    assert np.median(approx.series["step_time"]) == pytest.approx(np.median(exact.series["step_time"]), rel=0.02)


def test_terminal_playback_streams_a_long_recording(long_run: Path) -> None:
    from replay.player import Bound, Playback

    with replay.open(long_run) as rec:
        expected = build_summary(rec.bounded_view(BUDGET))
        pb = Playback(rec, row_budget=BUDGET)
        assert pb.streaming
        # played by the clock: segments are opened as it reaches them, and let go once played
        held = []
        for frac in (0.1, 0.5, 0.9):
            pb.advance_to(pb.t_begin + frac * (pb.t_end - pb.t_begin))
            held.append(sum(s.n for s in pb._streams))
            assert 0 < pb.store.snapshot().total_rows("step_time") < RANKS * STEPS
        assert max(held) < BUDGET
        end = pb.finish()
        assert pb._streams == [] and pb.done
        assert end.total_rows() <= BUDGET and "step_time" in end.digests
        assert build_summary(end) == expected
        # a window streams only its segments and keeps its rows whole
        windowed = Playback(rec, Bound("step", 100), Bound("step", 199), row_budget=BUDGET).finish()
        for r in range(RANKS):
            assert np.array_equal(windowed.columns("step_time", r)["step"], np.arange(100, 200))


def test_dashboard_source_is_bounded_and_zooms_through_the_index(long_run: Path) -> None:
    from replay.dashboard import RecordingSource
    from traceml.drivers.web.context import AppContext

    with replay.open(long_run) as rec:
        src = RecordingSource(rec, staged=False, row_budget=BUDGET)
        assert src.bounded and not src.loading()
        view = src()
        assert view.total_rows() <= BUDGET and "step_time" in view.digests
        sampled = view.columns("step_time", 0)["step"]
        assert len(sampled[(sampled >= 1000) & (sampled <= 1199)]) < 200
        zoom = src.zoomed((1000, 1199))
        assert zoom is not None and not zoom.digests
        for r in range(RANKS):
            steps = zoom.columns("step_time", r)["step"]
            assert np.array_equal(steps, np.arange(1000, 1200))
        assert src.zoomed((1000, 1199)) is zoom  # remembered: the app caches its figures per view
        assert src.zoomed((0, STEPS)) is None  # the whole run: more than the budget allows, the sample is drawn
        ctx = AppContext(
            main=src,
            compare=None,
            labels=("a", "b"),
            plot_labels=("a", "b"),
            live=False,
            refresh_s=1.0,
            max_points=2000,
            zoomed=src.zoomed,
        )
        assert ctx.params(None, [1000, 1199])[0] is zoom
        assert ctx.params(None, None)[0] is view


def test_a_restrided_sample_is_the_sample_drawn_at_that_stride() -> None:
    from traceml.views.bounded import RowSample

    run = synthetic_run(ranks=2, steps=3_000, seed=9)
    tables = ("step_time", "process")
    fine = {t: RowSample(3, tail_steps=64) for t in tables}
    coarse = {t: RowSample(12, tail_steps=64) for t in tables}
    for a in range(0, 3_000, 250):
        for r in (0, 1):
            for table in tables:
                cols = run[r][table]
                n = len(cols["ts_ns"])
                part = {k: v[a * n // 3_000 : (a + 250) * n // 3_000] for k, v in cols.items()}
                fine[table].add(r, part)
                coarse[table].add(r, part)
        if a == 1_500:
            for s in fine.values():
                s.restride(6)  # halfway through, as a followed file outgrows its sample
    for table in tables:
        fine[table].restride(12)
        assert fine[table].rows() == coarse[table].rows() < 3_000
        got, want = fine[table].finish(), coarse[table].finish()
        for r in (0, 1):
            assert got[r].keys() == want[r].keys()
            for k in want[r]:
                assert np.array_equal(got[r][k], want[r][k]), (table, k)
    with pytest.raises(ValueError, match="multiple"):
        fine["step_time"].restride(18)
