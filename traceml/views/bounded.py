"""Bounded statistics of a recording too long to hold: what report, compare and replay read instead of every row.

A reader streams a recording's batches (segment by segment) through two pure accumulators:

* :class:`StepDigest` turns every ``step_time`` row into :class:`StepTotals`: per rank the exact
  counts, sums and first/last step, and quantile sketches (:mod:`traceml.views.sketch`, 1%
  relative error) of the step time, of each phase and of the time outside backward; per step
  number the job's step time (the slowest rank's) and phase time (the ranks' mean), sketched once
  every rank has the step.  So the run-level figures of :mod:`traceml.views.measures` keep their
  definitions and are exact in counts, sums, means, shares, throughput and elapsed time, and
  within 1% in medians and p95.
* :class:`RowSample` keeps, within a row budget, a sample of the rows themselves: every row whose
  step number is a multiple of the *stride* (every rank has the same sampled steps, so the
  rank-by-rank comparisons of the diagnosis still line up), every stride-th row of tables without
  steps, and the last :data:`TAIL_STEPS` steps of every rank whole (the "recent" diagnosis and the
  end of a replay).  The diagnosis rules read this sample.

Pure: numpy in, numpy out; no clock, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from traceml.schema import PHASES
from traceml.views.steps import _phases, _rank_rows
from traceml.views.totals import RankTotals, StepTotals

Columns = Mapping[str, np.ndarray]

#: the last this many step numbers of every rank are held whole by a RowSample
TAIL_STEPS = 512
#: ``StoreView.digests`` key of the StepTotals
STEP_TOTALS = "step_time"

__all__ = ["STEP_TOTALS", "TAIL_STEPS", "RankTotals", "RowSample", "StepDigest", "StepTotals", "sample_stride"]


class StepDigest:
    """Feed ``step_time`` batches of any ranks in file order (:meth:`add`); :meth:`finish` gives the totals.

    ``ranks``: the ranks with ``step_time`` rows (a step is *common* once all of them have it);
    ``warmup_below``: the first analysed step number.  Memory: the sketches plus the steps not yet
    seen on every rank (a few segments' worth when ranks move together).
    """

    def __init__(self, ranks: Iterable[int], *, warmup_below: int, warmup_steps: int, stride: int) -> None:
        self._ranks = sorted(set(ranks))
        self.totals = StepTotals(stride=max(1, stride), warmup_below=warmup_below, warmup_steps=warmup_steps)
        nphase = len(PHASES)
        #: pending job steps: step, ranks seen, max step time, phase sums and finite counts
        self._p_step = np.empty(0, np.int64)
        self._p_cnt = np.empty(0, np.int64)
        self._p_max = np.empty(0)
        self._p_sum = np.empty((nphase, 0))
        self._p_n = np.empty((nphase, 0))

    def add(self, rank: int, cols: Columns) -> None:
        idx, failed, n = _rank_rows(cols)
        t = self.totals
        t.failed_rows += failed
        t.recorded_rows += n
        if not len(idx):
            return
        steps = np.asarray(cols["step"], np.int64)[idx]
        sel = idx[steps >= t.warmup_below]
        if not len(sel):
            return
        steps = np.asarray(cols["step"], np.int64)[sel]
        ts = np.asarray(cols["ts_ns"], np.int64)[sel]
        step_us = np.asarray(cols["step_us"])[sel].astype(np.float64)
        step_us[step_us < 0] = np.nan
        phases = _phases(cols, sel, step_us)
        rt = t.per_rank.get(rank)
        if rt is None:
            rt = t.per_rank[rank] = RankTotals(rank)
        rt.steps += len(sel)
        rt.step_sum_us += float(np.nansum(step_us))
        rt.step.add(step_us)
        rt.outside_backward.add(step_us - np.nan_to_num(phases["backward"]))
        for p in PHASES:
            rt.phases[p].add(phases[p])
            rt.phase_sum_us[p] += float(np.nansum(phases[p]))
        lo, hi = int(np.argmin(steps)), int(np.argmax(steps))
        if rt.first_step < 0 or steps[lo] < rt.first_step:
            rt.first_step = int(steps[lo])
            rt.start_ns = int(ts[lo]) - int(np.nan_to_num(step_us[lo])) * 1000
        if steps[hi] >= rt.last_step:
            rt.last_step, rt.end_ns = int(steps[hi]), int(ts[hi])
        self._pend(steps, step_us, np.stack([phases[p] for p in PHASES]))

    def _pend(self, steps: np.ndarray, step_us: np.ndarray, phases: np.ndarray) -> None:
        all_steps = np.concatenate([self._p_step, steps])
        cnt = np.concatenate([self._p_cnt, np.ones(len(steps), np.int64)])
        mx = np.concatenate([self._p_max, step_us])
        finite = np.isfinite(phases)
        psum = np.concatenate([self._p_sum, np.where(finite, phases, 0.0)], axis=1)
        pn = np.concatenate([self._p_n, finite.astype(np.float64)], axis=1)
        order = np.argsort(all_steps, kind="stable")
        s = all_steps[order]
        starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
        self._p_step = s[starts]
        self._p_cnt = np.add.reduceat(cnt[order], starts)
        self._p_max = np.fmax.reduceat(mx[order], starts)
        self._p_sum = np.add.reduceat(psum[:, order], starts, axis=1)
        self._p_n = np.add.reduceat(pn[:, order], starts, axis=1)
        done = self._p_cnt >= len(self._ranks)
        if done.any():
            self._flush(done, common=True)

    def _flush(self, which: np.ndarray, *, common: bool) -> None:
        t = self.totals
        steps = self._p_step[which]
        t.steps += len(steps)
        if common:
            t.common_steps += len(steps)
            t.job_step_common.add(self._p_max[which])
        t.job_step.add(self._p_max[which])
        with np.errstate(all="ignore"):
            means = self._p_sum[:, which] / self._p_n[:, which]
        for i, p in enumerate(PHASES):
            t.job_phases[p].add(means[i])
        if len(steps):
            lo, hi = int(steps.min()), int(steps.max())
            t.first_step = lo if t.first_step < 0 else min(t.first_step, lo)
            t.last_step = max(t.last_step, hi)
        keep = ~which
        self._p_step, self._p_cnt, self._p_max = self._p_step[keep], self._p_cnt[keep], self._p_max[keep]
        self._p_sum, self._p_n = self._p_sum[:, keep], self._p_n[:, keep]

    @property
    def pending(self) -> int:
        """Step numbers not yet seen on every rank."""
        return len(self._p_step)

    def finish(self) -> StepTotals:
        """The totals; steps some rank never had count in the job's series but not as common steps."""
        if len(self._p_step):
            self._flush(np.ones(len(self._p_step), bool), common=False)
        self.totals.per_rank = dict(sorted(self.totals.per_rank.items()))
        return self.totals


class RowSample:
    """A bounded sample of one table's rows per rank: rows of sampled step numbers plus each
    rank's last :data:`TAIL_STEPS` steps (tables with a ``step`` column), or every stride-th row."""

    def __init__(self, stride: int, tail_steps: int = TAIL_STEPS) -> None:
        self.stride = max(1, stride)
        self.tail_steps = tail_steps
        self._sampled: dict[int, list[dict[str, np.ndarray]]] = {}
        self._tail: dict[int, dict[str, np.ndarray]] = {}
        self._seen: dict[int, int] = {}

    def add(self, rank: int, cols: Mapping[str, np.ndarray]) -> None:
        n = len(next(iter(cols.values()), ()))
        if not n:
            return
        if "step" not in cols:  # every stride-th row, and the last ``tail_steps`` rows whole
            first = self._seen.get(rank, 0)
            self._seen[rank] = first + n
            pos = np.arange(first, first + n)
            pick = np.flatnonzero(pos % self.stride == 0)
            if len(pick):
                part = {k: np.asarray(v)[pick] for k, v in cols.items()}
                part["_pos"] = pos[pick]
                self._sampled.setdefault(rank, []).append(part)
            tail = self._tail.get(rank)
            both = dict(cols) if tail is None else {k: np.concatenate([tail[k], np.asarray(cols[k])]) for k in cols}
            both["_pos"] = pos if tail is None else np.concatenate([tail["_pos"], pos])
            self._tail[rank] = {k: np.asarray(v)[-self.tail_steps :] for k, v in both.items()}
            return
        step = np.asarray(cols["step"], np.int64)
        pick = np.flatnonzero(step % self.stride == 0)
        if len(pick):
            self._sampled.setdefault(rank, []).append({k: np.asarray(v)[pick] for k, v in cols.items()})
        tail = self._tail.get(rank)
        both = dict(cols) if tail is None else {k: np.concatenate([tail[k], np.asarray(cols[k])]) for k in cols}
        s = np.asarray(both["step"], np.int64)
        cut = int(s.max()) - self.tail_steps
        keep = s > cut
        self._tail[rank] = {k: np.asarray(v)[keep] for k, v in both.items()}

    def rows(self) -> int:
        held = sum(len(next(iter(c.values()))) for parts in self._sampled.values() for c in parts)
        return held + sum(len(next(iter(c.values()))) for c in self._tail.values())

    def finish(self) -> dict[int, dict[str, np.ndarray]]:
        """Per rank: the sampled rows, then the tail rows not sampled already, in file order."""
        out: dict[int, dict[str, np.ndarray]] = {}
        for rank in sorted(set(self._sampled) | set(self._tail)):
            parts = list(self._sampled.get(rank, []))
            tail = self._tail.get(rank)
            if tail is not None and "_pos" in tail:  # rows without steps: by their position
                first_pos = int(tail["_pos"][0]) if len(tail["_pos"]) else 1 << 62
                parts = [{k: v[c["_pos"] < first_pos] for k, v in c.items() if k != "_pos"} for c in parts]
                parts.append({k: v for k, v in tail.items() if k != "_pos"})
            elif tail is not None and len(tail["step"]):
                first_tail = int(np.min(tail["step"]))
                parts = [{k: v[c["step"] < first_tail] for k, v in c.items()} for c in parts]
                parts.append(tail)
            parts = [c for c in parts if len(next(iter(c.values())))]
            if parts:
                out[rank] = (
                    parts[0] if len(parts) == 1 else {k: np.concatenate([c[k] for c in parts]) for k in parts[0]}
                )
        return out


def sample_stride(rows: int, budget: int) -> int:
    """The stride that keeps about ``budget`` of ``rows`` (1 when they fit)."""
    return 1 if rows <= budget or budget <= 0 else math.ceil(rows / budget)
