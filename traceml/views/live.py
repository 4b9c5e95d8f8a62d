"""Live dashboard view models: pure functions ``StoreView -> frozen dataclasses``.

No clock and no I/O: "now" is ``view.latest_ns`` and everything else comes from the view's
tables, rank table, metadata (run name, start time, recording path and bytes, expected ranks)
and attachments (``exit``, ``summary``).  The same functions serve the live aggregator and
replay, because both hand over the same :class:`~traceml.store.StoreView`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from traceml.schema import PHASES
from traceml.store import StoreView

#: steps per rank the live phase table looks back over
DEFAULT_WINDOW_STEPS = 100

#: ``view.meta`` keys the aggregator (or replay) sets and the views read
META_RUN_NAME = "run_name"
META_START_NS = "start_ns"
META_EXPECTED_RANKS = "expected_ranks"
META_STATUS = "status"  # "starting" | "running" | "finishing" | "finished"
META_RECORDING_PATH = "recording_path"
META_RECORDING_BYTES = "recording_bytes"
META_RECORDING_ERROR = "recording_error"

NAN = float("nan")


@dataclass(frozen=True)
class PhaseRow:
    """One phase over the window: median of the ranks' medians, and the worst rank's median."""

    phase: str
    median_us: float
    worst_us: float
    worst_rank: int
    #: ``median_us`` as a share of the median step time (percent)
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
    steps_per_s: float
    #: per phase then the total ``step`` row last; empty before the first step
    phases: tuple[PhaseRow, ...]
    #: 100 * (slowest - fastest) / fastest over the ranks' median step times; nan with < 2 ranks
    skew_pct: float
    slowest_rank: int
    ranks: tuple[RankRow, ...]
    nodes: tuple[NodeRow, ...]
    drops_total: int
    recording: RecordingInfo


# --- helpers ---------------------------------------------------------------------------


def _valid_us(values: np.ndarray) -> np.ndarray:
    """Durations as float, the "not measured" ``-1`` (or any negative) turned into nan."""
    out = values.astype(np.float64)
    out[out < 0] = np.nan
    return out


def _nanmedian(values: np.ndarray | Sequence[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(np.median(arr)) if arr.size else NAN


def _step_window(view: StoreView, rank: int, window: int | None) -> Mapping[str, np.ndarray]:
    """The last ``window`` steps of one rank that did not fail (all held steps when None)."""
    cols = view.columns("step_time", rank)
    if not cols or "step_us" not in cols or len(cols["step_us"]) == 0:
        return {}
    failed = cols.get("failed")
    keep = np.ones(len(cols["step_us"]), dtype=bool) if failed is None else failed == 0
    idx = np.flatnonzero(keep)
    if window is not None:
        idx = idx[-window:]
    return {name: arr[idx] for name, arr in cols.items()}


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


def _steps_per_s(win: Mapping[str, np.ndarray]) -> float:
    ts = win.get("ts_ns")
    if ts is None or len(ts) < 2:
        return NAN
    span_s = (int(ts[-1]) - int(ts[0])) / 1e9
    return (len(ts) - 1) / span_s if span_s > 0 else NAN


# --- the models ------------------------------------------------------------------------


def phase_rows(view: StoreView, window: int | None = DEFAULT_WINDOW_STEPS) -> tuple[PhaseRow, ...]:
    """Median and worst rank per phase over each rank's last ``window`` successful steps."""
    per_rank: dict[int, Mapping[str, np.ndarray]] = {}
    for rank in view.table_ranks("step_time"):
        win = _step_window(view, rank, window)
        if win:
            per_rank[rank] = win
    if not per_rank:
        return ()
    rows: list[PhaseRow] = []
    medians_by_col: dict[str, dict[int, float]] = {}
    for col in [f"{p}_us" for p in PHASES] + ["step_us"]:
        medians_by_col[col] = {
            rank: _nanmedian(_valid_us(win[col])) if col in win else NAN for rank, win in per_rank.items()
        }
    step_median = _nanmedian(list(medians_by_col["step_us"].values()))
    for phase, col in [(p, f"{p}_us") for p in PHASES] + [("step", "step_us")]:
        medians = medians_by_col[col]
        valid = {r: v for r, v in medians.items() if not math.isnan(v)}
        if not valid:
            rows.append(PhaseRow(phase, NAN, NAN, -1, NAN))
            continue
        worst_rank = max(valid, key=lambda r: (valid[r], -r))
        median = _nanmedian(list(valid.values()))
        share = 100.0 * median / step_median if step_median and not math.isnan(step_median) else NAN
        rows.append(PhaseRow(phase, median, valid[worst_rank], worst_rank, share))
    return tuple(rows)


def rank_skew(view: StoreView, window: int | None = DEFAULT_WINDOW_STEPS) -> tuple[float, int]:
    """``(skew_pct, slowest_rank)``; ``(nan, -1)`` without steps.

    DDP's all-reduce makes fast ranks wait inside backward for the slowest one, so their step
    times match and a median of step times cannot name the straggler.  The gap is therefore
    taken on the time outside backward (the phases DDP does not equalise) when that gap is the
    larger one, and on the step time otherwise (ranks that do not synchronise every step).
    The skew is that gap as a percentage of the fastest rank's median step.
    """
    steps: dict[int, float] = {}
    outside: dict[int, float] = {}
    for rank in view.table_ranks("step_time"):
        win = _step_window(view, rank, window)
        if win:
            step_us = _valid_us(win["step_us"])
            m = _nanmedian(step_us)
            if not math.isnan(m):
                steps[rank] = m
                bwd = np.asarray(win["backward_us"], dtype=np.float64)
                if len(bwd) == len(step_us):
                    outside[rank] = _nanmedian(step_us - np.where(bwd >= 0, bwd, 0.0))
    if not steps:
        return NAN, -1
    slowest = max(steps, key=lambda r: (steps[r], -r))
    if len(steps) < 2:
        return NAN, slowest
    fastest = min(steps.values())
    gap = steps[slowest] - fastest
    valid_outside = {r: v for r, v in outside.items() if not math.isnan(v)}
    if len(valid_outside) == len(steps):
        ne_slowest = max(valid_outside, key=lambda r: (valid_outside[r], -r))
        ne_gap = valid_outside[ne_slowest] - min(valid_outside.values())
        if ne_gap > gap:
            slowest, gap = ne_slowest, ne_gap
    skew = 100.0 * gap / fastest if fastest > 0 else NAN
    return skew, slowest


def rank_rows(view: StoreView, window: int | None = DEFAULT_WINDOW_STEPS) -> tuple[RankRow, ...]:
    expected = int(view.meta.get(META_EXPECTED_RANKS, 0) or 0)
    ranks = sorted(set(view.ranks) | set(range(expected)))
    rows = []
    for rank in ranks:
        info = view.rank_info.get(rank)
        win = _step_window(view, rank, window)
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
                step_median_us=_nanmedian(_valid_us(win["step_us"])) if win else NAN,
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
    rates = [_steps_per_s(_step_window(view, r, window)) for r in view.table_ranks("step_time")]
    skew, slowest = rank_skew(view, window)
    ranks = rank_rows(view, window)
    return LiveModel(
        run_name=str(view.meta.get(META_RUN_NAME, "") or ""),
        status=str(view.meta.get(META_STATUS, "running") or "running"),
        elapsed_s=elapsed,
        window_steps=window,
        expected_ranks=int(view.meta.get(META_EXPECTED_RANKS, 0) or 0),
        last_step=max((r.last_step for r in ranks), default=-1),
        steps_per_s=_nanmedian(rates),
        phases=phase_rows(view, window),
        skew_pct=skew,
        slowest_rank=slowest,
        ranks=ranks,
        nodes=node_rows(view),
        drops_total=view.dropped(),
        recording=recording_info(view),
    )
