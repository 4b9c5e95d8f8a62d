"""Bounded statistics of a recording too long to hold: what report, compare and replay read instead of every row.

:class:`StepDigest` gives exact counts/sums and 1% sketches; :class:`RowSample` keeps a stride sample plus the
last :data:`TAIL_STEPS` steps whole.  Pure: numpy in, numpy out; no clock, no I/O.
"""

from __future__ import annotations

import copy
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

    ``ranks``: the ranks with ``step_time`` rows (a step is *common* when all of them have it);
    ``warmup_below``: the first analysed step number.  Each rank's rows are expected in step
    order (as a rank writes them): once every rank has sent a step number past ``s``, step ``s``
    is final and sketched.  Memory: the sketches plus one slot per step number between the
    slowest and the fastest rank's newest step.
    """

    def __init__(self, ranks: Iterable[int], *, warmup_below: int, warmup_steps: int, stride: int) -> None:
        self._ranks = sorted(set(ranks))
        self.totals = StepTotals(stride=max(1, stride), warmup_below=warmup_below, warmup_steps=warmup_steps)
        #: the newest step number each rank has sent (any row): every rank is past the minimum
        self._newest: dict[int, int] = {}
        #: per step number from ``_base`` on (dense): ranks seen, max step time, phase sums, finite counts
        self._base: int | None = None
        self._cnt = np.zeros(0, np.int64)
        self._max = np.zeros(0)
        self._sum = np.zeros((len(PHASES), 0))
        self._n = np.zeros((len(PHASES), 0))

    def add(self, rank: int, cols: Columns) -> None:
        idx, failed, n = _rank_rows(cols)
        t = self.totals
        t.failed_rows += failed
        t.recorded_rows += n
        if n:
            newest = int(np.max(np.asarray(cols["step"], np.int64)))
            self._newest[rank] = max(self._newest.get(rank, newest), newest)
        if not len(idx):
            self._settle()
            return
        steps = np.asarray(cols["step"], np.int64)[idx]
        sel = idx[steps >= t.warmup_below]
        if not len(sel):
            self._settle()
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
        self._settle()

    def _pend(self, steps: np.ndarray, step_us: np.ndarray, phases: np.ndarray) -> None:
        """Add one rank's rows (distinct step numbers) to the per-step job values."""
        if self._base is None:
            self._base = int(steps.min())
        late = steps < self._base  # a step every rank had passed already: out of order, left out of the job's
        if late.any():
            steps, step_us, phases = steps[~late], step_us[~late], phases[:, ~late]
            if not len(steps):
                return
        at = steps - self._base
        need = int(at.max()) + 1
        if need > len(self._cnt):
            grow = max(need, 2 * len(self._cnt)) - len(self._cnt)
            self._cnt = np.concatenate([self._cnt, np.zeros(grow, np.int64)])
            self._max = np.concatenate([self._max, np.full(grow, np.nan)])
            self._sum = np.concatenate([self._sum, np.zeros((len(PHASES), grow))], axis=1)
            self._n = np.concatenate([self._n, np.zeros((len(PHASES), grow))], axis=1)
        finite = np.isfinite(phases)
        self._cnt[at] += 1
        self._max[at] = np.fmax(self._max[at], step_us)
        self._sum[:, at] += np.where(finite, phases, 0.0)
        self._n[:, at] += finite

    def _settle(self, final: bool = False) -> None:
        """Sketch the job's values of every step all ranks have gone past (or all, at the end)."""
        if self._base is None or not len(self._cnt):
            return
        if final:
            k = len(self._cnt)
        elif len(self._newest) < len(self._ranks):
            return
        else:
            k = min(len(self._cnt), min(self._newest.values()) - self._base + 1)
        if k <= 0:
            return
        t = self.totals
        cnt = self._cnt[:k]
        present = cnt > 0
        common = cnt >= len(self._ranks)
        if present.any():
            steps = self._base + np.flatnonzero(present)
            t.steps += int(present.sum())
            t.common_steps += int(common.sum())
            t.job_step.add(self._max[:k][present])
            t.job_step_common.add(self._max[:k][common])
            with np.errstate(all="ignore"):
                means = self._sum[:, :k][:, present] / self._n[:, :k][:, present]
            for i, p in enumerate(PHASES):
                t.job_phases[p].add(means[i])
            lo, hi = int(steps[0]), int(steps[-1])
            t.first_step = lo if t.first_step < 0 else min(t.first_step, lo)
            t.last_step = max(t.last_step, hi)
        self._cnt, self._max = self._cnt[k:].copy(), self._max[k:].copy()
        self._sum, self._n = self._sum[:, k:].copy(), self._n[:, k:].copy()
        self._base += k

    @property
    def pending(self) -> int:
        """Step numbers held until every rank has gone past them."""
        return int((self._cnt > 0).sum())

    def finish(self) -> StepTotals:
        """The totals; steps some rank never had count in the job's series but not as common steps."""
        self._settle(final=True)
        self.totals.per_rank = dict(sorted(self.totals.per_rank.items()))
        return self.totals

    def peek(self) -> StepTotals:
        """The totals of the rows so far, as :meth:`finish` would give them now; the digest goes on
        taking rows (a followed file: its pending steps stay pending)."""
        return copy.deepcopy(self).finish()

    def restride(self, stride: int) -> None:
        """The held sample's steps are now the multiples of ``stride`` (:meth:`RowSample.restride`)."""
        self.totals.stride = max(1, stride)


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

    def restride(self, stride: int) -> None:
        """Keep only the sampled rows of the new, coarser ``stride`` (a multiple of the old one, so the
        sample stays the one a single pass at that stride would have drawn); the tails are unchanged."""
        if stride <= self.stride:
            return
        if stride % self.stride:
            raise ValueError(f"stride {stride}: expected a multiple of the sample's stride {self.stride}")
        self.stride = stride
        for rank, parts in self._sampled.items():
            kept = []
            for c in parts:
                on = c["_pos"] if "_pos" in c else np.asarray(c["step"], np.int64)
                keep = on % stride == 0
                if keep.any():
                    kept.append(c if keep.all() else {k: v[keep] for k, v in c.items()})
            self._sampled[rank] = kept

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
