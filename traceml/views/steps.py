"""Step rows as every view and rule sees them: failed steps and warm-up removed, optionally the last N.

One window feeds the diagnosis, the summary and ``traceml compare``, so they agree on which steps count.
Missing-value and region rules: docs/internals.md, "Chart views".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from traceml.schema import PHASES, TIMELINE_PHASES, phase_starts
from traceml.store import StoreView

if TYPE_CHECKING:
    from traceml.views.totals import StepTotals

#: distinct step numbers skipped at the start of the run (compilation, cudnn autotune, caches) ...
WARMUP_STEPS = 5
#: ... but never more than this fraction of the run's steps, so short runs keep their data
WARMUP_MAX_FRACTION = 0.2

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
    #: region name -> float64 us per step (0 = not entered in that step): the region's whole time
    regions: Mapping[str, np.ndarray] = field(default_factory=dict)
    #: region name -> float64 us per step: the part taken out of ``residual`` (outside the standard phases)
    regions_own: Mapping[str, np.ndarray] = field(default_factory=dict)
    #: region name -> calls summed over the analysed steps
    region_calls: Mapping[str, int] = field(default_factory=dict)

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
    #: region name -> microseconds summed over ranks, for calls made between steps inside the window
    between_regions: Mapping[str, float] = field(default_factory=dict)
    #: region name -> calls made between steps inside the window
    between_calls: Mapping[str, int] = field(default_factory=dict)
    #: a long recording read in bounded memory: the whole run's exact counts and sketches, while
    #: ``per_rank`` holds only the sampled steps (multiples of ``totals.stride``); None otherwise
    totals: StepTotals | None = None

    def region_names(self) -> tuple[str, ...]:
        """Every region entered in an analysed step, by name."""
        return tuple(sorted({n for rs in self.per_rank.values() for n in rs.regions}))

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
            if common is None:
                common = rs.step
            elif not np.array_equal(common, rs.step):  # the usual case (every rank, every step) skips this
                common = np.intersect1d(common, rs.step, assume_unique=True)
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
    first = arrays[0]
    distinct_sorted = len(first) < 2 or bool(np.all(first[1:] > first[:-1]))
    if distinct_sorted and all(np.array_equal(first, a) for a in arrays[1:]):
        return first  # the usual case: every rank has the same steps, in order
    a = np.sort(np.concatenate(arrays), kind="stable")
    return a[np.concatenate(([True], a[1:] != a[:-1]))] if len(a) else a


def warmup_count(distinct_steps: int) -> int:
    """How many leading step numbers are warm-up: WARMUP_STEPS, capped at WARMUP_MAX_FRACTION of the run."""
    return min(WARMUP_STEPS, int(distinct_steps * WARMUP_MAX_FRACTION))


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
            values = np.asarray(raw)[idx].astype(np.float64)
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


def step_data(
    view: StoreView,
    *,
    last_n: int | None = None,
    step_range: tuple[int, int] | None = None,
    ranks: Iterable[int] | None = None,
) -> StepData:
    """The analysed steps of every rank: failed rows and warm-up dropped, then the last ``last_n``.

    With ``step_range`` (inclusive bounds, a zoomed chart) the steps are those in the range and
    no warm-up is dropped; ``ranks`` keeps only those ranks."""
    if last_n is not None and last_n < 1:
        last_n = 1
    totals = view.digests.get("step_time") if last_n is None and step_range is None and ranks is None else None
    raw: dict[int, tuple[Mapping[str, np.ndarray], np.ndarray]] = {}
    failed_rows = recorded = 0
    wanted = None if ranks is None else set(ranks)
    for rank in view.table_ranks("step_time"):
        if wanted is not None and rank not in wanted:
            continue
        cols = view.columns("step_time", rank)
        idx, failed, n = _rank_rows(cols)
        failed_rows += failed
        recorded += n
        if totals is not None:  # a sample held with a whole tail: the sampled steps only, warm-up out
            st = np.asarray(cols["step"], np.int64)[idx]
            idx = idx[(st % totals.stride == 0) & (st >= totals.warmup_below)]
        if len(idx):
            raw[rank] = (cols, idx)
    if last_n is not None and step_range is None:
        # the union's last N step numbers lie within each rank's last N rows (any N numbers of one
        # rank are numbers of the union); with the warm-up's few more, a long live store is not sorted
        # whole at every refresh, and the window is the same
        keep = last_n + WARMUP_STEPS
        raw = {r: (c, i[-keep:]) for r, (c, i) in raw.items()}
    all_steps = union_sorted([np.asarray(c["step"], np.int64)[i] for c, i in raw.values()])
    if step_range is not None:
        warm = 0
        all_steps = all_steps[(all_steps >= step_range[0]) & (all_steps <= step_range[1])]
    elif totals is not None:
        warm = 0  # taken out above
    else:
        warm = warmup_count(len(all_steps))
    window = all_steps[warm:]
    if last_n is not None:
        window = window[-last_n:]
    per_rank: dict[int, RankSteps] = {}
    for rank, (cols, idx) in raw.items():
        steps = np.asarray(cols["step"], np.int64)[idx]
        # the window is a suffix of the sorted union, so a rank's share of it is a suffix too
        sel = idx[(steps >= window[0]) & (steps <= window[-1])] if len(window) else idx[:0]
        if not len(sel):
            continue
        step_us = np.asarray(cols["step_us"])[sel].astype(np.float64)
        step_us[step_us < 0] = np.nan
        per_rank[rank] = RankSteps(
            rank=rank,
            step=np.asarray(cols["step"], np.int64)[sel],
            ts_ns=np.asarray(cols["ts_ns"], np.int64)[sel],
            step_us=step_us,
            phases=_phases(cols, sel, step_us),
        )
    window_used = union_sorted([rs.step for rs in per_rank.values()])
    for rank, rs in list(per_rank.items()):
        if view.rows("step_region", rank):
            timeline = view.columns("step_timeline", rank) if view.rows("step_timeline", rank) else None
            per_rank[rank] = with_regions(rs, view.columns("step_region", rank), timeline)
    between, between_calls = _between_regions(view, per_rank)
    if totals is not None:
        warm, failed_rows, recorded = totals.warmup_steps, totals.failed_rows, totals.recorded_rows
    return StepData(
        ranks=tuple(sorted(per_rank)),
        per_rank=per_rank,
        steps=window_used,
        warmup_steps=warm,
        failed_rows=failed_rows,
        recorded_rows=recorded,
        last_n=last_n,
        between_regions=between,
        between_calls=between_calls,
        totals=totals,
    )


#: region names kept apart; beyond this many (by time) the rest are summed under OTHER_REGIONS
MAX_REGIONS = 16
#: region names are shown at most this many characters long
MAX_REGION_NAME = 64
OTHER_REGIONS = "(other regions)"


def _region_name(name: object) -> str:
    text = str(name)
    return text if len(text) <= MAX_REGION_NAME else text[: MAX_REGION_NAME - 1] + "\u2026"


def _kept_names(names: np.ndarray, time_us: np.ndarray) -> dict[str, str]:
    """Each region name (shortened) -> the name it is shown under: itself, or OTHER_REGIONS past MAX_REGIONS."""
    totals: dict[str, float] = {}
    for n, t in zip(names.tolist(), time_us.tolist(), strict=True):
        key = _region_name(n)
        totals[key] = totals.get(key, 0.0) + float(t)
    order = sorted(totals, key=lambda n: (-totals[n], n))
    keep = order if len(order) <= MAX_REGIONS else order[: MAX_REGIONS - 1]
    kept = set(keep)
    return {n: (n if n in kept else OTHER_REGIONS) for n in order}


def region_split(
    step_us: np.ndarray,
    residual: np.ndarray,
    totals: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """How much of each region's time per step lies outside the standard phases, from durations alone.

    The rows say how long each region ran and how long the step spent outside the phases (its
    residual), so a region is charged to residual up to the residual it could fit in: when the
    regions of a step sum to more than its residual, the residual is shared in proportion to their
    time (regions that overlap a phase then take less out of residual).
    """
    if not totals:
        return {}
    resid = np.nan_to_num(residual)
    total = sum(totals.values(), np.zeros(len(step_us)))
    with np.errstate(all="ignore"):
        scale = np.where(total > resid, resid / np.where(total > 0, total, 1.0), 1.0)
    return {n: v * scale for n, v in totals.items()}


def _placed_outside(
    rs: RankSteps,
    pos: np.ndarray,
    start_us: np.ndarray,
    cpu_us: np.ndarray,
    timeline: Mapping[str, np.ndarray],
    tl_pos: np.ndarray,
) -> np.ndarray:
    """For region calls (``start_us`` from their step's start, ``cpu_us`` long, in the steps at
    ``pos``), the part no phase interval covers; -1 where the rows cannot place it."""
    known = tl_pos >= 0
    safe = np.where(known, tl_pos, 0)
    durations, gaps = [], []
    for p in TIMELINE_PHASES:
        col = timeline.get(f"{p}_gap_us")
        values = rs.phases.get(p)
        if col is None or values is None or len(col) == 0:
            return np.full(len(pos), -1.0)
        durations.append(np.nan_to_num(values[pos]))
        gaps.append(np.asarray(col, np.float64)[safe])
    lo, hi = start_us, start_us + cpu_us
    covered = np.zeros(len(pos))
    for dur, ps in zip(durations, phase_starts(durations, gaps), strict=True):
        ok = known & (ps >= 0) & (dur > 0)
        covered += np.where(ok, np.maximum(0.0, np.minimum(hi, ps + dur) - np.maximum(lo, ps)), 0.0)
    return np.where(known, np.clip(cpu_us - covered, 0.0, cpu_us), -1.0)


def with_regions(
    rs: RankSteps, cols: Mapping[str, np.ndarray], timeline: Mapping[str, np.ndarray] | None = None
) -> RankSteps:
    """``rs`` with its named regions (``step_region`` columns ``cols``) and residual less their part
    outside the standard phases.

    A region called once in a step whose start was recorded (``start_us``) is placed against the
    phases' intervals from ``timeline`` (the ``step_timeline`` columns, their gaps turned into start
    offsets by :func:`traceml.schema.phase_starts`): its time that
    no phase covers is its own, exactly (a phase called several times in the step is taken as one
    interval from its first start).  The other region rows are charged to what is left of residual
    by :func:`region_split`."""
    steps = np.asarray(cols.get("step", ()), np.int64)
    names = np.asarray(cols.get("name", ()), dtype=object)
    cpu = np.asarray(cols.get("cpu_us", ()), np.float64)
    if not len(steps) or not len(rs.step) or not (len(names) == len(cpu) == len(steps)):
        return rs
    idx = np.clip(np.searchsorted(rs.step, steps), 0, len(rs.step) - 1)
    hit = np.flatnonzero((steps >= 0) & (rs.step[idx] == steps) & (cpu >= 0))
    if not len(hit):
        return rs
    n = len(rs.step)
    start_col = cols.get("start_us")
    starts = np.asarray(start_col, np.float64) if start_col is not None and len(start_col) == len(steps) else None
    ncalls = np.asarray(cols.get("calls", np.ones(len(steps))), np.int64)
    if len(ncalls) != len(steps):
        ncalls = np.ones(len(steps), np.int64)
    tl_index: np.ndarray | None = None
    if timeline is not None and starts is not None:
        tl_steps = np.asarray(timeline.get("step", ()), np.int64)
        if len(tl_steps):
            order = np.argsort(tl_steps, kind="stable")
            j = np.clip(np.searchsorted(tl_steps[order], rs.step), 0, len(tl_steps) - 1)
            tl_index = np.where(tl_steps[order][j] == rs.step, order[j], -1)
    shown = _kept_names(names[hit], cpu[hit])
    keys = sorted(set(shown.values()))
    which = np.array([keys.index(shown[_region_name(x)]) for x in names[hit]], dtype=np.int64)
    pos = idx[hit]
    own = np.full(len(hit), -1.0)
    if starts is not None and tl_index is not None and timeline is not None:
        single = (ncalls[hit] == 1) & (starts[hit] >= 0)
        if single.any():
            placed_own = _placed_outside(rs, pos, starts[hit], cpu[hit], timeline, tl_index[pos])
            own = np.where(single, placed_own, -1.0)
    totals, placed, unplaced, calls = {}, {}, {}, {}
    for k, key in enumerate(keys):
        sel = which == k
        totals[key] = np.bincount(pos[sel], weights=cpu[hit][sel], minlength=n).astype(np.float64)
        ok = sel & (own >= 0)
        placed[key] = np.bincount(pos[ok], weights=own[ok], minlength=n).astype(np.float64)
        rest = sel & (own < 0)
        unplaced[key] = np.bincount(pos[rest], weights=cpu[hit][rest], minlength=n).astype(np.float64)
        calls[key] = int(np.where(ncalls[hit][sel] > 0, ncalls[hit][sel], 1).sum())
    resid = rs.phases["residual"]
    left = np.maximum(0.0, np.nan_to_num(resid) - sum(placed.values(), np.zeros(n)))
    shared = region_split(rs.step_us, left, unplaced)
    own_part = {k: placed[k] + shared[k] for k in totals}
    taken = sum(own_part.values(), np.zeros(n))
    phases = dict(rs.phases)
    phases["residual"] = np.where(np.isfinite(resid), np.maximum(0.0, resid - taken), resid)
    return replace(rs, phases=phases, regions=totals, regions_own=own_part, region_calls=calls)


def _between_regions(view: StoreView, per_rank: Mapping[int, RankSteps]) -> tuple[dict[str, float], dict[str, int]]:
    out: dict[str, float] = {}
    calls: dict[str, int] = {}
    for rank, rs in per_rank.items():
        if not len(rs) or not view.rows("step_region", rank):
            continue
        cols = view.columns("step_region", rank)
        steps = np.asarray(cols.get("step", ()), np.int64)
        ts = np.asarray(cols.get("ts_ns", ()), np.int64)
        cpu = np.asarray(cols.get("cpu_us", ()), np.float64)
        names = cols.get("name", ())
        if not (len(steps) == len(ts) == len(cpu) == len(names)):
            continue
        start = int(rs.ts_ns[0]) - int(np.nan_to_num(rs.step_us[0])) * 1000
        sel = np.flatnonzero((steps < 0) & (ts >= start) & (ts <= int(rs.ts_ns[-1])) & (cpu >= 0))
        for i in sel:
            name = _region_name(names[i])
            out[name] = out.get(name, 0.0) + float(cpu[i])
            calls[name] = calls.get(name, 0) + 1
    if len(out) > MAX_REGIONS:
        order = sorted(out, key=lambda n: (-out[n], n))
        rest = sum(out[n] for n in order[MAX_REGIONS - 1 :])
        out = {n: out[n] for n in order[: MAX_REGIONS - 1]}
        out[OTHER_REGIONS] = rest
        calls = {n: c for n, c in calls.items() if n in out}
    return dict(sorted(out.items())), calls


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
