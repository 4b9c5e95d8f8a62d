"""Series views: reduction (min/max), step / rank / time models on hand-built stores."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from traceml import views
from traceml.schema import PHASES, STEP_TIME
from traceml.store import ColumnStore, RankInfo
from traceml.testing.synthetic import START_NS, store_from_run, synthetic_run
from traceml.views.live import rank_skew


def step_rows(rank_phase_us: dict[str, list[int]], steps: list[int], start_ns: int = START_NS) -> dict:
    n = len(steps)
    phases = {f"{p}_us": np.asarray(rank_phase_us.get(p, [0] * n), dtype=np.int64) for p in PHASES}
    total = sum(phases.values())
    return {
        "step": np.asarray(steps, dtype=np.int64),
        "ts_ns": start_ns + np.cumsum(total) * 1000,
        "failed": np.zeros(n, dtype=np.uint8),
        "step_us": total,
        **phases,
    }


def store_with(*per_rank: dict, meta: dict | None = None) -> ColumnStore:
    store = ColumnStore(capacity=None, meta=meta or {"run_name": "t", "start_ns": START_NS})
    for r, cols in enumerate(per_rank):
        store.append(r, "step_time", cols, STEP_TIME)
    return store


# --- reduction ---------------------------------------------------------------------------------


def test_minmax_keeps_short_series_untouched() -> None:
    x = np.arange(10)
    y = np.arange(10.0)
    xs, ys = views.downsample_minmax(x, y, 100)
    assert xs is x and ys is y


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=3000),
    max_points=st.integers(6, 500),
)
def test_minmax_bounds_points_and_keeps_every_extreme(values: list[float], max_points: int) -> None:
    y = np.asarray(values)
    x = np.arange(len(y))
    xs, ys = views.downsample_minmax(x, y, max_points)
    assert len(xs) <= max_points
    assert np.all(np.diff(xs) > 0)  # original order, no duplicates
    assert np.array_equal(ys, y[xs])  # real points, not averages
    assert ys.max() == y.max() and ys.min() == y.min()
    assert xs[0] == 0 and xs[-1] == len(y) - 1


def test_minmax_keeps_each_buckets_spike() -> None:
    y = np.zeros(100_000)
    spikes = [7, 31_337, 99_999]
    y[spikes] = [5.0, 9.0, 3.0]
    y[50_000] = -4.0
    xs, ys = views.downsample_minmax(np.arange(len(y)), y, 1000)
    assert len(xs) <= 1000
    assert set(spikes) | {50_000} <= set(xs.tolist())


def test_minmax_ignores_nan_unless_the_whole_bucket_is_nan() -> None:
    y = np.arange(1000, dtype=float)
    y[::2] = np.nan
    y[500:] = np.nan
    xs, ys = views.downsample_minmax(np.arange(1000), y, 50)
    assert np.nanmax(ys) == 499.0
    assert np.isnan(ys).any()  # the all-nan half stays a gap


@settings(max_examples=60, deadline=None)
@given(
    chunks=st.lists(st.lists(st.integers(-1, 5000), max_size=60), min_size=1, max_size=4),
    q=st.floats(0, 1),
)
def test_counting_quantiles_equal_numpy(chunks: list[list[int]], q: float) -> None:
    arrays = [np.asarray(c, dtype=np.int64) for c in chunks]
    valid = np.concatenate(arrays)
    valid = valid[valid >= 0]
    got = views.quantiles_us(arrays, (q,))[0]
    if not len(valid):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(float(np.percentile(valid, q * 100)), abs=1e-9)


def test_wide_value_ranges_fall_back_to_partition() -> None:
    a = np.array([0, 10**9, 5, 7], dtype=np.int64)
    assert views.quantiles_us([a], (0.5,))[0] == pytest.approx(np.percentile(a, 50))


# --- step views ----------------------------------------------------------------------------------


def test_breakdown_at_full_resolution_is_the_mean_over_ranks_per_step() -> None:
    r0 = step_rows({"forward": [1000, 2000, 3000], "backward": [500, 500, 500]}, [0, 1, 2])
    r1 = step_rows({"forward": [3000, 4000, 5000], "backward": [1500, 1500, 1500]}, [0, 1, 2])
    view = store_with(r0, r1).snapshot()
    bd = views.step_breakdown(view)
    assert bd.bucket_steps == 1
    assert bd.steps.tolist() == [0, 1, 2]
    assert bd.phases["forward"].tolist() == [2.0, 3.0, 4.0]
    assert bd.phases["backward"].tolist() == [1.0, 1.0, 1.0]
    assert bd.total_ms.tolist() == [3.0, 4.0, 5.0]
    # the median step is the job's, as in summary.json: the slowest rank's time per step (rank 1
    # here), over the steps after the warm-up (3 steps: none is warm-up)
    job = np.maximum(r0["step_us"], r1["step_us"])
    assert bd.median_ms == pytest.approx(np.median(job) / 1000)
    assert bd.p95_ms == pytest.approx(np.percentile(job, 95) / 1000)
    only_r1 = views.step_breakdown(view, ranks=[1])
    assert only_r1.phases["forward"].tolist() == [3.0, 4.0, 5.0]
    assert only_r1.ranks == (1,)


def test_breakdown_buckets_by_step_value_and_range_requery_is_exact() -> None:
    n = 10_000
    fwd = (np.arange(n) % 100 + 1) * 10
    view = store_with(step_rows({"forward": fwd.tolist()}, list(range(n)))).snapshot()
    bd = views.step_breakdown(view, max_buckets=100)
    assert bd.bucket_steps == 100 and len(bd.steps) == 100
    assert bd.phases["forward"][0] == pytest.approx(fwd[:100].mean() / 1000)
    zoom = views.step_breakdown(view, step_range=(250, 349), max_buckets=100)
    assert zoom.bucket_steps == 1
    assert zoom.steps.tolist() == list(range(250, 350))
    assert zoom.phases["forward"].tolist() == (fwd[250:350] / 1000).tolist()


def test_ranks_with_gaps_line_up_by_step_value() -> None:
    r0 = step_rows({"forward": [1000] * 4}, [0, 1, 2, 3])
    r1 = step_rows({"forward": [3000] * 2}, [2, 3])
    view = store_with(r0, r1).snapshot()
    bd = views.step_breakdown(view)
    assert bd.phases["forward"].tolist() == [1.0, 1.0, 2.0, 2.0]
    rs = views.rank_steps(view)
    assert np.isnan(rs.heat_ms[1, 0]) and rs.heat_ms[1, 2] == 3.0
    assert rs.heat_ranks == (0, 1)


def test_failed_and_unmeasured_steps_stay_out_of_the_statistics() -> None:
    cols = step_rows({"forward": [1000, 1000, 1000, 50_000]}, [0, 1, 2, 3])
    cols["failed"][3] = 1
    cols["dataloader_us"][0] = -1  # not measured: counts as 0 in the stack, never negative
    view = store_with(cols).snapshot()
    bd = views.step_breakdown(view)
    assert bd.median_ms == pytest.approx(1.0)
    assert bd.phases["dataloader"].min() >= 0
    rs = views.rank_steps(view)
    assert rs.stats[0].median_ms == pytest.approx(1.0)


def test_rank_steps_marks_the_slowest_rank_and_skew_matches_the_live_view() -> None:
    run = synthetic_run(ranks=4, steps=400, slow_rank=2, seed=3)
    view = store_from_run(run).snapshot()
    rs = views.rank_steps(view)
    skew, slowest = rank_skew(view, window=None)
    assert rs.slowest_rank == slowest == 2
    assert rs.skew_pct == pytest.approx(skew)
    assert [t.rank for t in rs.traces] == [0, 1, 2, 3]
    assert rs.heat_ms.shape == (4, 400)
    assert all(t.points == 400 for t in rs.traces)


def test_rank_steps_reduces_long_runs_per_trace() -> None:
    view = store_from_run(synthetic_run(ranks=2, steps=50_000, sample_every=1000)).snapshot()
    rs = views.rank_steps(view, max_points=1000, heat_buckets=200)
    assert all(len(t.x) <= 1000 and t.downsampled for t in rs.traces)
    assert rs.heat_ms.shape == (2, 200)
    raw = view.columns("step_time", 0)["step_us"]
    assert rs.traces[0].y.max() == pytest.approx(raw.max() / 1000)


def test_step_range_maps_to_the_time_those_steps_took() -> None:
    cols = step_rows({"forward": [1_000_000] * 10}, list(range(10)))  # 1 s per step
    view = store_with(cols).snapshot()
    lo, hi = views.step_range_to_time(view, (3, 5)) or (0, 0)
    assert (lo, hi) == pytest.approx((3.0, 6.0))
    assert views.step_range_to_time(view, None) is None
    assert views.step_range_of(view) == (0, 9)


def test_throughput_is_steps_per_second() -> None:
    cols = step_rows({"forward": [10_000] * 3000}, list(range(3000)))  # 10 ms per step
    view = store_with(cols).snapshot()
    tp = views.throughput(view)
    assert tp.mean_steps_per_s == pytest.approx(100.0, rel=1e-3)
    assert np.nanmedian(tp.steps_per_s) == pytest.approx(100.0, rel=0.05)
    assert tp.x_s[0] >= 0 and tp.x_s[-1] <= 30.0
    assert views.throughput(ColumnStore().snapshot()).empty


def test_empty_views_give_empty_models() -> None:
    view = ColumnStore().snapshot()
    assert views.step_breakdown(view).empty
    assert views.rank_steps(view).empty
    mem = views.memory_series(view)
    assert mem.rss == () and mem.gpu_alloc == ()
    sysm = views.system_series(view)
    assert not sysm.host_recorded and not sysm.gpu_recorded


# --- memory, system, run info -------------------------------------------------------------------


def test_memory_and_system_series_per_rank_node_and_gpu() -> None:
    run = synthetic_run(ranks=4, steps=2000, gpu=True, nodes=2, sample_every=10)
    view = store_from_run(run).snapshot()
    mem = views.memory_series(view, ranks=[0, 3])
    assert [t.rank for t in mem.rss] == [0, 3]
    assert [t.rank for t in mem.gpu_alloc] == [0, 3] and [t.rank for t in mem.gpu_peak] == [0, 3]
    assert mem.gpu_total_gib == pytest.approx(80.0)
    rss0 = run[0]["process"]["rss_bytes"]
    assert mem.rss[0].y.max() == pytest.approx(rss0.max() / 1024**3)
    sysm = views.system_series(view)
    assert [t.name for t in sysm.cpu_pct] == ["node 0 CPU", "node 1 CPU"]
    assert sorted(t.group for t in sysm.gpu_util_pct) == [
        "node 0 GPU 0",
        "node 0 GPU 1",
        "node 1 GPU 0",
        "node 1 GPU 1",
    ]
    assert sysm.ram_total_gib == pytest.approx(256.0)


def test_cpu_only_runs_have_no_gpu_series_and_missing_values_are_gaps() -> None:
    run = synthetic_run(ranks=1, steps=200, gpu=False, sample_every=10)
    run[0]["process"]["rss_bytes"][3] = -1
    view = store_from_run(run).snapshot()
    mem = views.memory_series(view)
    assert mem.gpu_alloc == () and mem.gpu_peak == () and len(mem.rss) == 1
    assert np.isnan(mem.rss[0].y[3])
    assert not views.system_series(view).gpu_recorded


def test_time_window_limits_time_series() -> None:
    view = store_from_run(synthetic_run(ranks=1, steps=2000, sample_every=10)).snapshot()
    full = views.memory_series(view).rss[0]
    part = views.memory_series(view, time_range=(2.0, 4.0)).rss[0]
    assert part.x.min() >= 2.0 and part.x.max() <= 4.0
    assert part.points < full.points


def test_run_info_lists_meta_ranks_environment_and_integrity() -> None:
    store = store_from_run(synthetic_run(ranks=2, steps=50))
    store.set_rank(RankInfo(rank=1, host="gpu-7", state="finished", exit_status="ok", drops={"process": 3}))
    store.attach("environment/rank0", {"python": "3.11", "torch": "2.13"})
    store.set_integrity({"status": "recovered", "skipped": [], "lost_bytes": 120})
    info = views.run_info(store.snapshot())
    assert info.title == "synthetic"
    assert ("steps", "0 .. 49") in info.meta
    assert ("1", "gpu-7", "finished", "ok", "50", "3") in info.ranks
    assert ("torch", "2.13") in info.environment
    assert info.integrity_status == "recovered"
    assert ("lost_bytes", "120") in info.integrity
    assert ("dropped on ranks", "3 rows") in info.integrity
    assert views.run_info(ColumnStore().snapshot()).integrity_status == "live"
