"""The sides of ``traceml compare``: one run read from a recording (per-step series, warm-up and
failed steps removed, the diagnosis rules) or a summary.json (median, p95, count), and the
per-metric series and statistics the comparison draws from them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from replay import stats as st
from replay.compare_model import MIN_SAMPLES, MetricSpec, Side
from traceml.diagnosis import SCHEMA_VERSION as SUMMARY_SCHEMA_VERSION
from traceml.diagnosis import job_series, step_data
from traceml.diagnosis.summary import traceml_section
from traceml.errors import ReportError
from traceml.schema import PHASES
from traceml.store import StoreView
from traceml.views.final import traceml_cost_text

#: prefixes of the per-rank wall-time series (``cycle@0``, ``outside@0``, ...)
_CYCLE, _OUTSIDE = "cycle@", "outside@"


def _rank_keys(run: Side, prefix: str) -> list[str]:
    keys = [k for k in run.series if k.startswith(prefix)]
    return sorted(keys, key=lambda k: int(k[len(prefix) :]))


def series_for(spec: MetricSpec, run: Side) -> list[np.ndarray] | None:
    """The series a metric's statistic reads from a recording (the ranks' cycles for a rate or share)."""
    if spec.statistic in ("rate", "share"):
        cycles = _rank_keys(run, _CYCLE)
        names = cycles if spec.statistic == "rate" else cycles + [_OUTSIDE + k[len(_CYCLE) :] for k in cycles]
        if not cycles or any(n not in run.series for n in names):
            return None
    else:
        names = [spec.name]
    cols = [run.series.get(n) for n in names]
    if any(c is None for c in cols):
        return None
    return [np.asarray(c, np.float64) for c in cols if c is not None]


def _memory_series(view: StoreView, data: Any) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    peaks: list[np.ndarray] = []
    for r in view.table_ranks("step_memory"):
        cols = view.columns("step_memory", r)
        keep = np.isin(np.asarray(cols["step"], np.int64), data.steps)
        v = np.asarray(cols["peak_alloc_bytes"], np.float64)[keep]
        peaks.append(v[v >= 0])
    if any(len(p) for p in peaks):
        # the rank with the highest peak: memory limits bite on the fullest device
        out["peak_gpu_memory"] = max(peaks, key=lambda p: p.max() if len(p) else -1.0)
    span = data.time_range()
    rss_by_rank: list[np.ndarray] = []
    gpu_by_rank: list[np.ndarray] = []
    for r in view.table_ranks("process"):
        cols = view.columns("process", r)
        ts = np.asarray(cols["ts_ns"], np.int64)
        keep = np.ones(len(ts), bool) if span is None else (ts >= span[0]) & (ts <= span[1])
        rss = np.asarray(cols["rss_bytes"], np.float64)[keep]
        gpu = np.asarray(cols["gpu_alloc_bytes"], np.float64)[keep]
        rss_by_rank.append(rss[rss >= 0])
        gpu_by_rank.append(gpu[gpu >= 0])
    if any(len(p) for p in rss_by_rank):
        out["peak_rss"] = max(rss_by_rank, key=lambda p: p.max() if len(p) else -1.0)
    if "peak_gpu_memory" not in out and any(len(p) for p in gpu_by_rank):
        out["peak_gpu_memory"] = max(gpu_by_rank, key=lambda p: p.max() if len(p) else -1.0)
    return out


def _cycle_series(data: Any) -> dict[str, np.ndarray]:
    """Per rank and analysed step (ms, aligned on ``data.steps``; ``nan`` where the rank lacks the
    step): ``cycle@<rank>``, the wall time the step accounts for, and ``outside@<rank>``, the part
    of it outside any analysed step.

    A step's cycle runs from the end of the rank's previous analysed step to the end of this one
    (``ts_ns`` of consecutive rows; a failed step dropped between them counts as outside time);
    the first analysed step's cycle is its own step time.  Summed, a rank's cycles are its elapsed
    wall time from the start of its first analysed step to the end of its last, so steps / sum of
    cycles is its measured throughput and sum(outside) / sum(cycles) its share of wall time outside
    any step (evaluation, checkpointing, logging, a slow batch between steps): the definitions of
    :mod:`traceml.views.measures`, which the report and the views quote.
    """
    out: dict[str, np.ndarray] = {}
    for r in data.ranks:
        rs = data.per_rank[r]
        if not len(rs.step):
            continue
        step_ms = np.asarray(rs.step_us, np.float64) / 1000.0
        # a bounded read holds every stride-th step: a gap between held steps is that many cycles,
        # and a held step's outside time is the mean cycle less its step (unclipped: unbiased)
        sampled = getattr(data, "totals", None) is not None
        per = np.diff(rs.step).astype(np.float64) if sampled else 1.0
        with np.errstate(all="ignore"):
            dt_ms = np.diff(rs.ts_ns.astype(np.float64)) / 1e6 / per
            c = np.concatenate(([step_ms[0]], np.where(dt_ms >= 0, dt_ms, np.nan)))
            gap = c[1:] - step_ms[1:]
            o = np.concatenate(([0.0], gap if sampled else np.clip(gap, 0.0, None)))
        o = np.where(np.isfinite(c), o, np.nan)
        pos = np.searchsorted(data.steps, rs.step)
        cyc = np.full(len(data.steps), np.nan)
        outside = np.full(len(data.steps), np.nan)
        cyc[pos], outside[pos] = c, o
        out[f"{_CYCLE}{r}"], out[f"{_OUTSIDE}{r}"] = cyc, outside
    return out


def side_from_view(view: StoreView, path: str = "") -> Side:
    """A recording: per-step job series (warm-up and failed steps removed) and its wall-time cycles."""
    data = step_data(view)
    job = job_series(data)
    series: dict[str, np.ndarray] = {"step_time": job["step"] / 1000}
    for p in PHASES:
        series[f"phase.{p}"] = job[p] / 1000
    series.update(_cycle_series(data))
    series.update(_memory_series(view, data))
    return Side(
        path=path,
        kind="recording",
        run_id=str(view.meta.get("run_id", "") or ""),
        name=str(view.meta.get("run_name", "") or ""),
        steps=len(data.steps),
        series=series,
        step_numbers=data.steps,
        cost=traceml_cost_text(
            {"traceml": traceml_section(view, float(np.median(job["step"])) / 1000 if len(job["step"]) else None)}
        ),
    )


def side_from_summary(summary: Mapping[str, Any], path: str = "") -> Side:
    """A summary.json: per-metric (median, p95, n) from the summary's statistics."""
    version = summary.get("schema_version")
    if not isinstance(version, int) or "steps" not in summary:
        raise ReportError(
            f"{path or 'summary'}: expected a traceml summary.json (with schema_version and steps); "
            f"found keys {sorted(summary)[:8]}"
        )
    if version > SUMMARY_SCHEMA_VERSION:
        raise ReportError(
            f"{path}: summary schema_version {version} is newer than this traceml understands "
            f"({SUMMARY_SCHEMA_VERSION}); upgrade traceml"
        )
    steps = summary.get("steps") or {}
    n = int(steps.get("count") or 0)
    overall = steps.get("overall") or {}
    stats: dict[str, tuple[float, float, int]] = {}

    def add(metric: str, stat: Mapping[str, Any] | None) -> None:
        if stat and stat.get("median_ms") is not None and stat.get("p95_ms") is not None:
            stats[metric] = (float(stat["median_ms"]), float(stat["p95_ms"]), n)

    add("step_time", overall.get("step"))
    for p in PHASES:
        add(f"phase.{p}", overall.get(p))
    if "step_time" in stats:
        med, p95, _ = stats["step_time"]
        tput = steps.get("throughput_steps_per_s")
        rate = float(tput) if isinstance(tput, int | float) and tput > 0 else (1000 / med if med > 0 else 0.0)
        if rate > 0 and med > 0:
            # steps/s carries the step time's relative uncertainty (its p95 mirrored below the rate)
            stats["throughput"] = (rate, rate * (1 + (p95 - med) / med), n)
    share = steps.get("outside_step_share")
    if isinstance(share, int | float) and math.isfinite(share) and 0 <= share <= 1:
        stats["outside_share"] = (float(share), float(share), n)  # one figure per run: no spread
    memory = summary.get("memory") or {}
    for metric, key in (("peak_gpu_memory", "peak_gpu_alloc_bytes"), ("peak_rss", "peak_rss_bytes")):
        if memory.get(key) is not None:
            v = float(memory[key])
            stats[metric] = (v, v, 1)
    run = summary.get("run") or {}
    return Side(
        path=path,
        kind="summary",
        run_id=str(run.get("id", "") or ""),
        name=str(run.get("name", "") or ""),
        steps=n,
        stats=stats,
        cost=traceml_cost_text(summary),
    )


def run_stats(spec: MetricSpec, run: Side) -> tuple[float, float, int] | None:
    """(median, p95, n) of a recording's metric for the approximate comparison."""
    if spec.statistic == "share":
        cols = series_for(spec, run)
        if cols is None or st.finite_count(cols) == 0:
            return None
        with np.errstate(all="ignore"):
            share = st.point_estimate(st.RUN_STATISTICS["share"], cols)
        return (share, share, st.finite_count(cols)) if math.isfinite(share) else None
    if spec.statistic == "rate":
        cols = series_for(spec, run)
        step = run.series.get("step_time")
        if cols is None or step is None:
            return None
        rate = st.point_estimate(st.RUN_STATISTICS["rate"], cols)
        v = step[np.isfinite(step)]
        if not len(v) or not math.isfinite(rate):
            return None
        med, p95 = float(np.median(v)), float(np.percentile(v, 95))
        return (rate, rate * (1 + (p95 - med) / med) if med > 0 else rate, len(v))
    if spec.name not in run.series:
        return None
    values = run.series[spec.name]
    v = values[np.isfinite(values)]
    if not len(v):
        return (float("nan"), float("nan"), 0)
    if spec.statistic == "p95":  # memory: a summary carries only the peak, so compare peaks
        p = float(np.max(v))
        return (p, p, len(v))
    return (float(np.median(v)), float(np.percentile(v, 95)), len(v))


def align_steps(runs: Sequence[Side]) -> tuple[list[Side], tuple[int, int, int] | None]:
    """Restrict every recording's step series to the step numbers all of them have (when enough overlap)."""
    common: np.ndarray | None = None
    for s in runs:
        common = s.step_numbers if common is None else np.intersect1d(common, s.step_numbers)
    if common is None or len(common) < MIN_SAMPLES:
        return list(runs), None

    def cut(s: Side) -> Side:
        keep = np.isin(s.step_numbers, common)
        series = {
            k: (v[keep] if len(v) == len(s.step_numbers) and not k.startswith("peak_") else v)
            for k, v in s.series.items()
        }
        return Side(s.path, s.kind, s.run_id, s.name, len(common), series, s.stats, s.step_numbers[keep], s.cost)

    return [cut(s) for s in runs], (int(common[0]), int(common[-1]), len(common))


def load_side(path: str | Path) -> Side:
    """A recording (``.tml``) or a ``summary.json``, by content."""
    p = Path(path)
    if not p.is_file():
        raise ReportError(f"{str(p)!r} not found; expected a .tml recording or a summary.json from `traceml report`")
    try:
        with p.open("rb") as fh:
            head = fh.read(64).lstrip()
    except OSError as exc:
        raise ReportError(f"cannot read {str(p)!r}: {exc}") from exc
    if head.startswith(b"{"):
        try:
            summary = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ReportError(
                f"{str(p)!r} is not valid JSON ({exc}); expected a summary.json from `traceml report`"
            ) from exc
        if not isinstance(summary, dict):
            raise ReportError(f"{str(p)!r}: expected a JSON object (summary.json), found {type(summary).__name__}")
        return side_from_summary(summary, str(p))
    from replay.report import load_view

    return side_from_view(load_view(p), str(p))
