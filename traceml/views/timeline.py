"""Time views: StoreView -> series over time (s since the run's origin) for charts: throughput
(steps per second), memory per rank, host and GPU samples per node.  Pure; long series are
reduced with :func:`~traceml.views.downsample.downsample_minmax`."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from traceml.store import StoreView
from traceml.views.downsample import MAX_POINTS, Trace, downsample_minmax
from traceml.views.select import StepRange, TimeRange, origin_ns, range_slice, selected_ranks
from traceml.views.stepsources import step_source

_EMPTY_F = np.empty(0, dtype=np.float64)


@dataclass(frozen=True)
class Throughput:
    """Steps per second over time (s since origin), averaged over the selected ranks running then."""

    x_s: np.ndarray
    steps_per_s: np.ndarray
    mean_steps_per_s: float
    steps: int

    @property
    def empty(self) -> bool:
        return self.steps == 0


@dataclass(frozen=True)
class MemorySeries:
    """Per-rank memory over time (s since origin), in GiB; empty tuples when not recorded."""

    rss: tuple[Trace, ...]
    gpu_alloc: tuple[Trace, ...]
    gpu_peak: tuple[Trace, ...]
    gpu_total_gib: float


@dataclass(frozen=True)
class SystemSeries:
    """Per-node host and per-GPU device samples over time (s since origin)."""

    cpu_pct: tuple[Trace, ...]
    ram_used_gib: tuple[Trace, ...]
    ram_total_gib: float
    gpu_util_pct: tuple[Trace, ...]
    gpu_mem_gib: tuple[Trace, ...]
    gpu_temp_c: tuple[Trace, ...]
    gpu_power_w: tuple[Trace, ...]

    @property
    def host_recorded(self) -> bool:
        return bool(self.cpu_pct or self.ram_used_gib)

    @property
    def gpu_recorded(self) -> bool:
        return bool(self.gpu_util_pct or self.gpu_mem_gib or self.gpu_temp_c or self.gpu_power_w)


def throughput(
    view: StoreView,
    ranks: Iterable[int] | None = None,
    step_range: StepRange | None = None,
    max_points: int = MAX_POINTS,
) -> Throughput:
    """Completed steps per second per time bucket, averaged over the ranks running in that bucket."""
    t0 = origin_ns(view)
    # per rank: step completion times and how many steps completed at each (1 per raw row; a rollup
    # group counts all its steps at its last one)
    src = step_source(view, ranks, step_range)
    per_rank = [src.completions(r) for r in src.per_rank()]
    if not per_rank:
        return Throughput(_EMPTY_F, _EMPTY_F, math.nan, 0)
    lo = min(int(ts[0]) for ts, _ in per_rank)
    hi = max(int(ts[-1]) for ts, _ in per_rank)
    steps = min(int(n.sum()) for _, n in per_rank)
    span = max(hi - lo, 1)
    # each bucket should hold ~10 steps (or rollup groups) on average so the rate is not just quantisation noise
    events = min(len(ts) for ts, _ in per_rank)
    n_buckets = int(max(1, min(max_points, events // 10 if events < steps else steps // 10, span // 1_000_000)))
    width = span / n_buckets
    edges = lo + np.arange(1, n_buckets) * width
    total = np.zeros(n_buckets)
    active = np.zeros(n_buckets)
    for ts, counts in per_rank:
        cut = np.searchsorted(ts, edges, side="right")
        done = np.concatenate([[0], np.cumsum(counts)])
        total += np.diff(done[np.concatenate([[0], cut, [len(ts)]])])
        # a rank counts where it was running: between its first and last step (partial buckets too)
        active += (lo + (np.arange(n_buckets) + 1) * width >= ts[0]) & (lo + np.arange(n_buckets) * width <= ts[-1])
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(active > 0, total / np.maximum(active, 1) / (width / 1e9), np.nan)
    x = (lo - t0 + (np.arange(n_buckets) + 0.5) * width) / 1e9
    mean = float(
        np.mean(
            [(int(n.sum()) - 1) / max((int(ts[-1]) - int(ts[0])) / 1e9, 1e-9) for ts, n in per_rank if int(n.sum()) > 1]
            or [math.nan]
        )
    )
    return Throughput(x, rate, float(mean), steps)


def _time_trace(
    cols: Mapping[str, np.ndarray],
    column: str,
    t0: int,
    time_range: TimeRange | None,
    scale: float,
    name: str,
    max_points: int,
    rank: int | None = None,
    group: str = "",
) -> Trace | None:
    """One column over time (s since ``t0``), missing values as gaps, reduced to ``max_points``."""
    if column not in cols or "ts_ns" not in cols or not len(cols["ts_ns"]):
        return None
    ts = cols["ts_ns"]
    y = cols[column]
    if len(ts) > 1 and not bool(np.all(ts[1:] >= ts[:-1])):
        order = np.argsort(ts, kind="stable")
        ts, y = ts[order], y[order]
    x = (ts - t0) / 1e9
    if time_range is not None:
        sl = range_slice(x, time_range[0], time_range[1])
        x, y = x[sl], y[sl]
    yf = y.astype(np.float64)
    if y.dtype.kind in "iu":
        yf[y < 0] = np.nan
    if not len(yf) or bool(np.all(np.isnan(yf))):
        return None
    xs, ys = downsample_minmax(x, yf, max_points)
    return Trace(name, xs, ys * scale, rank=rank, points=len(yf), group=group)


def _where(cols: Mapping[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {c: v[mask] for c, v in cols.items()}


_GIB = 1.0 / (1024**3)


def memory_series(
    view: StoreView,
    ranks: Iterable[int] | None = None,
    time_range: TimeRange | None = None,
    max_points: int = MAX_POINTS,
) -> MemorySeries:
    """RSS and GPU allocated per rank (process table) and per-step GPU peak (step_memory)."""
    t0 = origin_ns(view)
    rss, alloc, peak = [], [], []
    total = 0.0
    for r in selected_ranks(view, "process", ranks):
        cols = view.columns("process", r)
        t = _time_trace(cols, "rss_bytes", t0, time_range, _GIB, f"rank {r} RSS", max_points, r)
        if t is not None:
            rss.append(t)
        t = _time_trace(cols, "gpu_alloc_bytes", t0, time_range, _GIB, f"rank {r} GPU alloc", max_points, r)
        if t is not None:
            alloc.append(t)
        tot = cols.get("gpu_total_bytes")
        if tot is not None and len(tot) and tot.max() > 0:
            total = max(total, float(tot.max()) * _GIB)
    for r in selected_ranks(view, "step_memory", ranks):
        cols = view.columns("step_memory", r)
        t = _time_trace(cols, "peak_alloc_bytes", t0, time_range, _GIB, f"rank {r} GPU peak", max_points, r)
        if t is not None:
            peak.append(t)
    return MemorySeries(tuple(rss), tuple(alloc), tuple(peak), total)


def system_series(view: StoreView, time_range: TimeRange | None = None, max_points: int = MAX_POINTS) -> SystemSeries:
    """Host CPU / RAM per node and utilisation, memory, temperature and power per GPU."""
    t0 = origin_ns(view)
    cpu: list[Trace] = []
    ram: list[Trace] = []
    ram_total = 0.0
    for r in view.table_ranks("system"):
        cols = view.columns("system", r)
        if "node_rank" not in cols or not len(cols["node_rank"]):
            continue
        for node in np.unique(cols["node_rank"]):
            sub = _where(cols, cols["node_rank"] == node)
            label = f"node {int(node)}"
            t = _time_trace(sub, "cpu_pct", t0, time_range, 1.0, f"{label} CPU", max_points, r, label)
            if t is not None:
                cpu.append(t)
            t = _time_trace(sub, "ram_used_bytes", t0, time_range, _GIB, f"{label} RAM", max_points, r, label)
            if t is not None:
                ram.append(t)
            tot = sub.get("ram_total_bytes")
            if tot is not None and len(tot) and tot.max() > 0:
                ram_total = max(ram_total, float(tot.max()) * _GIB)
    util: list[Trace] = []
    mem: list[Trace] = []
    temp: list[Trace] = []
    power: list[Trace] = []
    for r in view.table_ranks("system_gpu"):
        cols = view.columns("system_gpu", r)
        if "gpu_idx" not in cols or not len(cols["gpu_idx"]):
            continue
        pairs = np.unique(np.stack([cols["node_rank"].astype(np.int64), cols["gpu_idx"].astype(np.int64)]), axis=1)
        for node, gpu in pairs.T:
            sub = _where(cols, (cols["node_rank"] == node) & (cols["gpu_idx"] == gpu))
            label = f"node {int(node)} GPU {int(gpu)}"
            for column, scale, dest in (
                ("util_pct", 1.0, util),
                ("mem_used_bytes", _GIB, mem),
                ("temp_c", 1.0, temp),
                ("power_w", 1.0, power),
            ):
                t = _time_trace(sub, column, t0, time_range, scale, label, max_points, r, label)
                if t is not None:
                    dest.append(t)
    return SystemSeries(tuple(cpu), tuple(ram), ram_total, tuple(util), tuple(mem), tuple(temp), tuple(power))
