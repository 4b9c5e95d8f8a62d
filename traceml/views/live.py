"""Live dashboard view models: pure functions ``StoreView -> frozen dataclasses``.

No clock and no I/O ("now" is ``view.latest_ns``): the same functions serve the live aggregator and replay.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from traceml.store import StoreView
from traceml.store.view import (
    META_EXPECTED_RANKS,
    META_RECORDING_BYTES,
    META_RECORDING_ERROR,
    META_RECORDING_PATH,
    META_RUN_NAME,
    META_START_NS,
    META_STATUS,
)
from traceml.views.measures import JobMeasures, PartFigure, job_measures
from traceml.views.steps import StepData, step_data

#: step numbers of the job the live phase table looks back over
DEFAULT_WINDOW_STEPS = 100

NAN = float("nan")


@dataclass(frozen=True)
class PhaseRow:
    """One phase (or named region) over the window, as :mod:`traceml.views.measures` defines it:
    the median over the steps of the job's value, the rank with the highest median and that median,
    and the share of summed step time.  The ``step`` row names the slowest rank."""

    phase: str
    median_us: float
    worst_us: float
    worst_rank: int
    #: share of summed step time (percent): a ratio of sums, so the phases add up to 100
    share_pct: float


@dataclass(frozen=True)
class RankRow:
    rank: int
    node_rank: int
    host: str
    state: str
    #: steps seen (rows held + rows evicted from the live window)
    steps: int
    last_step: int
    step_median_us: float
    cpu_pct: float
    rss_bytes: int
    gpu_alloc_bytes: int
    #: highest per-step CUDA allocation peak over the window (-1 without CUDA)
    gpu_peak_bytes: int
    drops: int
    #: seconds between the rank's last message and the view's "now"; nan when never seen
    silent_s: float


@dataclass(frozen=True)
class GpuRow:
    gpu_idx: int
    util_pct: float
    mem_used_bytes: int
    mem_total_bytes: int
    temp_c: float
    power_w: float


@dataclass(frozen=True)
class NodeRow:
    node_rank: int
    cpu_pct: float
    ram_used_bytes: int
    ram_total_bytes: int
    gpus: tuple[GpuRow, ...]


@dataclass(frozen=True)
class RecordingInfo:
    path: str
    bytes: int
    #: empty when the recording is healthy (or disabled: ``path == ""``)
    error: str


@dataclass(frozen=True)
class LiveModel:
    """Everything the live dashboard shows."""

    run_name: str
    status: str
    #: seconds from the run's start to the newest row; nan before the first row
    elapsed_s: float
    window_steps: int
    expected_ranks: int
    #: highest step index seen on any rank (-1 before the first step)
    last_step: int
    #: measured: steps of the window over the wall time they took (time between steps included)
    steps_per_s: float
    #: per phase then the total ``step`` row last; empty before the first step
    phases: tuple[PhaseRow, ...]
    #: rank skew on the steps every rank has (traceml.views.measures); nan with < 2 ranks
    skew_pct: float
    slowest_rank: int
    ranks: tuple[RankRow, ...]
    nodes: tuple[NodeRow, ...]
    drops_total: int
    recording: RecordingInfo
    #: share (percent) of the window's wall time outside any step; nan before two steps
    outside_pct: float = NAN
    #: named regions (traceml.trace_time) entered in the window's steps, largest share first
    regions: tuple[PhaseRow, ...] = ()
    #: regions timed between steps: (name, percent of the wall time)
    between_regions: tuple[tuple[str, float], ...] = ()
    #: the current verdict, set by the driver (traceml.diagnosis.live): (kind, severity, summary)
    verdict: tuple[str, str, str] = ("", "", "")


# --- helpers ---------------------------------------------------------------------------


def _nanmedian(values: np.ndarray | Sequence[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(np.median(arr)) if arr.size else NAN


def _latest(view: StoreView, table: str, rank: int, column: str, default: Any) -> Any:
    cols = view.columns(table, rank)
    arr = cols.get(column) if cols else None
    if arr is None or len(arr) == 0:
        return default
    value = arr[-1]
    return value.item() if hasattr(value, "item") else value


def _rank_steps(view: StoreView, rank: int) -> int:
    return view.rows("step_time", rank) + int(view.evicted.get(("step_time", rank), 0))


def _last_step(view: StoreView, rank: int) -> int:
    steps = view.columns("step_time", rank).get("step")
    return int(steps.max()) if steps is not None and len(steps) else -1


def measures(view: StoreView, window: int | None = DEFAULT_WINDOW_STEPS) -> tuple[StepData, JobMeasures]:
    """The steps the panel looks at (the job's last ``window`` step numbers after the warm-up; the
    whole run when None) and the figures over them."""
    data = step_data(view, last_n=window)
    return data, job_measures(data)


def _row(part: PartFigure) -> PhaseRow:
    return PhaseRow(part.name, part.median_us, part.worst_us, part.worst_rank, 100.0 * part.share)


def phase_rows_of(m: JobMeasures) -> tuple[PhaseRow, ...]:
    """The phase rows then the ``step`` row (median step of the job, the slowest rank)."""
    if not m.steps:
        return ()
    rows = [_row(p) for p in m.phases]
    rows.append(PhaseRow("step", m.median_step_us, m.slowest_step_us, m.slowest_rank, NAN))
    return tuple(rows)


def region_rows_of(m: JobMeasures) -> tuple[PhaseRow, ...]:
    return tuple(_row(r) for r in m.regions)


def phase_rows(view: StoreView, window: int | None = DEFAULT_WINDOW_STEPS) -> tuple[PhaseRow, ...]:
    """Each phase over the job's last ``window`` steps (see :func:`measures`)."""
    return phase_rows_of(measures(view, window)[1])


def rank_skew(view: StoreView, window: int | None = DEFAULT_WINDOW_STEPS) -> tuple[float, int]:
    """``(skew_pct, slowest_rank)`` on the steps every rank has (traceml.views.measures.rank_skew)."""
    m = measures(view, window)[1]
    return m.skew_pct, m.slowest_rank


def rank_rows(
    view: StoreView, window: int | None = DEFAULT_WINDOW_STEPS, data: StepData | None = None
) -> tuple[RankRow, ...]:
    """One row per rank (and per expected rank not seen yet); the median step over the window's steps."""
    data = step_data(view, last_n=window) if data is None else data
    expected = int(view.meta.get(META_EXPECTED_RANKS, 0) or 0)
    ranks = sorted(set(view.ranks) | set(range(expected)))
    rows = []
    for rank in ranks:
        info = view.rank_info.get(rank)
        rs = data.per_rank.get(rank)
        peak = view.columns("step_memory", rank).get("peak_alloc_bytes")
        if peak is not None and window is not None:
            peak = peak[-window:]
        silent = NAN
        if info is not None and info.last_seen_ns and view.latest_ns:
            silent = max(0.0, (view.latest_ns - info.last_seen_ns) / 1e9)
        rows.append(
            RankRow(
                rank=rank,
                node_rank=info.node_rank if info else -1,
                host=info.host if info else "",
                state=info.state if info else "waiting",
                steps=_rank_steps(view, rank),
                last_step=_last_step(view, rank),
                step_median_us=_nanmedian(rs.step_us) if rs is not None else NAN,
                cpu_pct=float(_latest(view, "process", rank, "cpu_pct", NAN)),
                rss_bytes=int(_latest(view, "process", rank, "rss_bytes", -1)),
                gpu_alloc_bytes=int(_latest(view, "process", rank, "gpu_alloc_bytes", -1)),
                gpu_peak_bytes=int(peak.max()) if peak is not None and len(peak) else -1,
                drops=sum(info.drops.values()) if info else 0,
                silent_s=silent,
            )
        )
    return tuple(rows)


#: system samples looked at per rank: every node still reporting shows up in the newest rows
SYSTEM_TAIL_ROWS = 4096


def _last_per_key(keys: np.ndarray, ts: np.ndarray) -> dict[int, int]:
    """Index of the newest row (by ``ts_ns``, later rows win ties) for each distinct key,
    among the last :data:`SYSTEM_TAIL_ROWS` rows."""
    start = max(0, len(ts) - SYSTEM_TAIL_ROWS)
    keys, ts = keys[start:], ts[start:]
    newest_first = np.lexsort((np.arange(len(ts)), ts))[::-1]
    uniq, first = np.unique(keys[newest_first], return_index=True)
    return {int(k): start + int(newest_first[j]) for k, j in zip(uniq, first, strict=True)}


def node_rows(view: StoreView) -> tuple[NodeRow, ...]:
    """Latest system sample per node (and per GPU), whichever rank sent it."""
    latest: dict[int, tuple[int, float, int, int]] = {}
    for rank in view.table_ranks("system"):
        cols = view.columns("system", rank)
        if "ts_ns" not in cols or not len(cols["ts_ns"]):
            continue
        nodes = cols["node_rank"] if "node_rank" in cols else np.full(len(cols["ts_ns"]), -1)
        for node, i in _last_per_key(nodes, cols["ts_ns"]).items():
            ts = int(cols["ts_ns"][i])
            if node not in latest or ts >= latest[node][0]:
                latest[node] = (
                    ts,
                    float(cols["cpu_pct"][i]),
                    int(cols["ram_used_bytes"][i]),
                    int(cols["ram_total_bytes"][i]),
                )
    gpus: dict[tuple[int, int], tuple[int, GpuRow]] = {}
    for rank in view.table_ranks("system_gpu"):
        cols = view.columns("system_gpu", rank)
        if "ts_ns" not in cols or not len(cols["ts_ns"]):
            continue
        # one key per (node, gpu): node * 2**20 + gpu index
        keys = cols["node_rank"].astype(np.int64) * (1 << 20) + cols["gpu_idx"].astype(np.int64)
        for _, i in _last_per_key(keys, cols["ts_ns"]).items():
            key = (int(cols["node_rank"][i]), int(cols["gpu_idx"][i]))
            ts = int(cols["ts_ns"][i])
            if key not in gpus or ts >= gpus[key][0]:
                gpus[key] = (
                    ts,
                    GpuRow(
                        gpu_idx=key[1],
                        util_pct=float(cols["util_pct"][i]),
                        mem_used_bytes=int(cols["mem_used_bytes"][i]),
                        mem_total_bytes=int(cols["mem_total_bytes"][i]),
                        temp_c=float(cols["temp_c"][i]),
                        power_w=float(cols["power_w"][i]),
                    ),
                )
    out = []
    for node in sorted(set(latest) | {n for n, _ in gpus}):
        _, cpu, used, total = latest.get(node, (0, NAN, -1, -1))
        node_gpus = tuple(row for (n, _), (_, row) in sorted(gpus.items()) if n == node)
        out.append(NodeRow(node, cpu, used, total, node_gpus))
    return tuple(out)


def recording_info(view: StoreView) -> RecordingInfo:
    return RecordingInfo(
        path=str(view.meta.get(META_RECORDING_PATH, "") or ""),
        bytes=int(view.meta.get(META_RECORDING_BYTES, 0) or 0),
        error=str(view.meta.get(META_RECORDING_ERROR, "") or ""),
    )


def live_model(view: StoreView, window: int = DEFAULT_WINDOW_STEPS) -> LiveModel:
    """The whole live dashboard for one snapshot."""
    start_ns = int(view.meta.get(META_START_NS, 0) or 0)
    elapsed = (view.latest_ns - start_ns) / 1e9 if start_ns and view.latest_ns > start_ns else NAN
    data, m = measures(view, window)
    ranks = rank_rows(view, window, data)
    return LiveModel(
        run_name=str(view.meta.get(META_RUN_NAME, "") or ""),
        status=str(view.meta.get(META_STATUS, "running") or "running"),
        elapsed_s=elapsed,
        window_steps=window,
        expected_ranks=int(view.meta.get(META_EXPECTED_RANKS, 0) or 0),
        last_step=max((r.last_step for r in ranks), default=-1),
        steps_per_s=m.throughput_steps_per_s,
        phases=phase_rows_of(m),
        skew_pct=m.skew_pct,
        slowest_rank=m.slowest_rank,
        ranks=ranks,
        nodes=node_rows(view),
        drops_total=view.dropped(),
        recording=recording_info(view),
        outside_pct=100.0 * m.outside_share,
        regions=region_rows_of(m),
        between_regions=tuple((n, 100.0 * v) for n, v in m.between_regions.items()),
    )
