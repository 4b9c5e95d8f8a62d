"""Step rows as the rules see them: failed steps and warm-up removed, optionally the last N.

:func:`step_data` turns a view's ``step_time`` table into per-rank float arrays (microseconds,
``nan`` = not measured) restricted to one window of step numbers.  The same window feeds the
diagnosis, the summary statistics and ``traceml compare``, so they all agree on which steps count.

Missing-value rules: a ``dataloader_us`` or ``h2d_us`` of -1 is 0 (no DataLoader / no device
copy: the phase did not happen); ``forward/backward/optimizer`` of -1 stay ``nan`` (not
measured); a residual of -1 is recomputed as ``max(0, step - other phases)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from traceml.diagnosis import thresholds as th
from traceml.schema import PHASES
from traceml.store import StoreView

#: phases that default to 0 when not recorded (they did not happen)
ZERO_WHEN_MISSING = ("dataloader", "h2d")
COMPUTE_PHASES = ("forward", "backward", "optimizer")


@dataclass(frozen=True)
class RankSteps:
    """One rank's analysed steps, sorted by step number (one row per step)."""

    rank: int
    step: np.ndarray  # int64
    ts_ns: np.ndarray  # int64, end of step
    step_us: np.ndarray  # float64
    phases: Mapping[str, np.ndarray]  # phase -> float64 us (nan = not measured)

    def __len__(self) -> int:
        return len(self.step)

    def measured(self, phase: str) -> bool:
        values = self.phases[phase]
        return bool(len(values)) and bool(np.isfinite(values).any())


@dataclass(frozen=True)
class StepData:
    ranks: tuple[int, ...]
    per_rank: Mapping[int, RankSteps]
    #: distinct step numbers in the window (union over ranks), sorted
    steps: np.ndarray
    warmup_steps: int
    failed_rows: int
    recorded_rows: int
    last_n: int | None

    @property
    def empty(self) -> bool:
        return len(self.steps) == 0

    def min_rank_steps(self) -> int:
        return min((len(r) for r in self.per_rank.values()), default=0)

    def time_range(self) -> tuple[int, int] | None:
        """(start_ns, end_ns) covered by the window: start of its first step to end of its last."""
        starts, ends = [], []
        for rs in self.per_rank.values():
            if len(rs):
                starts.append(int(rs.ts_ns[0]) - int(np.nan_to_num(rs.step_us[0])) * 1000)
                ends.append(int(rs.ts_ns[-1]))
        if not starts:
            return None
        return min(starts), max(ends)

    def common_steps(self) -> np.ndarray:
        """Step numbers every rank of the window has."""
        common: np.ndarray | None = None
        for rs in self.per_rank.values():
            common = rs.step if common is None else np.intersect1d(common, rs.step, assume_unique=True)
        return np.empty(0, np.int64) if common is None else common

    def matrix(self, field: str, steps: np.ndarray) -> np.ndarray:
        """[rank, step] float64 matrix of ``field`` (``step`` or a phase) over ``steps``."""
        out = np.full((len(self.ranks), len(steps)), np.nan)
        for i, r in enumerate(self.ranks):
            rs = self.per_rank[r]
            if not len(rs.step):
                continue
            values = rs.step_us if field == "step" else rs.phases[field]
            if np.array_equal(rs.step, steps):  # the usual case: every rank has every step
                out[i] = values
                continue
            idx = np.clip(np.searchsorted(rs.step, steps), 0, len(rs.step) - 1)
            hit = rs.step[idx] == steps
            out[i, hit] = values[idx[hit]]
        return out


def union_sorted(arrays: list[np.ndarray]) -> np.ndarray:
    """Sorted distinct values of the int64 arrays (a sort and a diff: faster than np.unique here)."""
    if not arrays:
        return np.empty(0, np.int64)
    a = np.sort(np.concatenate(arrays), kind="stable")
    return a[np.concatenate(([True], a[1:] != a[:-1]))] if len(a) else a


def warmup_count(distinct_steps: int) -> int:
    """How many leading step numbers are warm-up: WARMUP_STEPS, capped at WARMUP_MAX_FRACTION of the run."""
    return min(th.WARMUP_STEPS, int(distinct_steps * th.WARMUP_MAX_FRACTION))


def _rank_rows(cols: Mapping[str, np.ndarray]) -> tuple[np.ndarray, int, int]:
    """Indices of a rank's usable rows (not failed, last row per step, sorted); failed and total counts."""
    step = np.asarray(cols.get("step", np.empty(0, np.int64)), dtype=np.int64)
    n = len(step)
    if n == 0:
        return np.empty(0, np.int64), 0, 0
    failed_col = cols.get("failed")
    failed = np.zeros(n, bool) if failed_col is None else np.asarray(failed_col) != 0
    keep = np.flatnonzero(~failed)
    kept_steps = step[keep]
    if bool(np.all(kept_steps[1:] > kept_steps[:-1])):  # the usual case: already one row per step, in order
        return keep, int(failed.sum()), n
    # one row per step: keep the last one written (np.unique on the reversed order finds it)
    rev = keep[::-1]
    _, first_in_rev = np.unique(step[rev], return_index=True)  # sorted by step number
    return rev[first_in_rev], int(failed.sum()), n


def _phases(cols: Mapping[str, np.ndarray], idx: np.ndarray, step_us: np.ndarray) -> dict[str, np.ndarray]:
    phases: dict[str, np.ndarray] = {}
    for p in PHASES:
        raw = cols.get(f"{p}_us")
        if raw is None:
            values = np.full(len(idx), np.nan)
        else:
            values = np.asarray(raw, dtype=np.float64)[idx]
            values[values < 0] = np.nan
        if p in ZERO_WHEN_MISSING:
            values = np.nan_to_num(values, nan=0.0)
        phases[p] = values
    resid = phases["residual"]
    missing = ~np.isfinite(resid)
    if missing.any():
        named = sum(np.nan_to_num(phases[p]) for p in PHASES if p != "residual")
        resid[missing] = np.maximum(0.0, step_us - named)[missing]
    return phases


def step_data(view: StoreView, *, last_n: int | None = None) -> StepData:
    """The analysed steps of every rank: failed rows and warm-up dropped, then the last ``last_n``."""
    if last_n is not None and last_n < 1:
        last_n = 1
    raw: dict[int, tuple[Mapping[str, np.ndarray], np.ndarray]] = {}
    failed_rows = recorded = 0
    for rank in view.table_ranks("step_time"):
        cols = view.columns("step_time", rank)
        idx, failed, n = _rank_rows(cols)
        failed_rows += failed
        recorded += n
        if len(idx):
            raw[rank] = (cols, idx)
    all_steps = union_sorted([np.asarray(c["step"], np.int64)[i] for c, i in raw.values()])
    warm = warmup_count(len(all_steps))
    window = all_steps[warm:]
    if last_n is not None:
        window = window[-last_n:]
    per_rank: dict[int, RankSteps] = {}
    for rank, (cols, idx) in raw.items():
        steps = np.asarray(cols["step"], np.int64)[idx]
        # the window is a suffix of the sorted union, so a rank's share of it is a suffix too
        sel = idx[steps >= window[0]] if len(window) else idx[:0]
        if not len(sel):
            continue
        step_us = np.asarray(cols["step_us"], dtype=np.float64)[sel]
        step_us[step_us < 0] = np.nan
        per_rank[rank] = RankSteps(
            rank=rank,
            step=np.asarray(cols["step"], np.int64)[sel],
            ts_ns=np.asarray(cols["ts_ns"], np.int64)[sel],
            step_us=step_us,
            phases=_phases(cols, sel, step_us),
        )
    window_used = union_sorted([rs.step for rs in per_rank.values()])
    return StepData(
        ranks=tuple(sorted(per_rank)),
        per_rank=per_rank,
        steps=window_used,
        warmup_steps=warm,
        failed_rows=failed_rows,
        recorded_rows=recorded,
        last_n=last_n,
    )


def job_series(data: StepData) -> dict[str, np.ndarray]:
    """One value per step for the whole job: ``step`` is the slowest rank's step time (the job
    moves at its pace); each phase is the mean over the ranks that have the step.  Also ``steps``."""
    steps = data.steps
    out: dict[str, np.ndarray] = {"steps": steps.astype(np.float64)}
    if not len(steps) or not data.ranks:
        out["step"] = np.empty(0)
        for p in PHASES:
            out[p] = np.empty(0)
        return out
    step_m = data.matrix("step", steps)
    with np.errstate(all="ignore"):
        out["step"] = _nan_reduce(step_m, np.nanmax)
        for p in PHASES:
            out[p] = _nan_reduce(data.matrix(p, steps), np.nanmean)
    return out


def _nan_reduce(m: np.ndarray, fn: object) -> np.ndarray:
    finite = np.isfinite(m).any(axis=0)
    res = np.full(m.shape[1], np.nan)
    if finite.any():
        res[finite] = fn(m[:, finite], axis=0)  # type: ignore[operator]
    return res
