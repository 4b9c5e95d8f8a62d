"""A recording as a :class:`StoreView` in bounded memory, whatever its length.

Within the row budget: exactly :meth:`Recording.view`; beyond it, one streamed pass into a digest and a row
sample the views read unchanged (docs/replay.md, "Long recordings").
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from traceml.errors import ConfigError
from traceml.format import SegmentInfo, rollup
from traceml.schema import STANDARD_TABLES, TableSchema, is_rollup, rollup_schema
from traceml.store import ColumnStore, StoreView
from traceml.views.bounded import STEP_TOTALS, TAIL_STEPS, RowSample, StepDigest, sample_stride
from traceml.views.steps import _rank_rows, warmup_count


class Recording(Protocol):
    """What a bounded read needs of :class:`replay.engine.Recording` (kept apart: no import cycle)."""

    @property
    def segments(self) -> list[SegmentInfo]: ...
    @property
    def schemas(self) -> dict[str, TableSchema]: ...
    @property
    def meta(self) -> dict[str, Any]: ...
    def fill_end_state(
        self, store: ColumnStore, tables: Mapping[str, Mapping[int, dict[str, np.ndarray]]] | None = None
    ) -> ColumnStore: ...
    def read_segment(self, seg: SegmentInfo) -> list[tuple[int, str, dict[str, np.ndarray]]]: ...
    def view(self) -> StoreView: ...


#: rows a bounded view holds at most (about), unless ``TRACEML_ROW_BUDGET`` says otherwise
DEFAULT_ROW_BUDGET = 1_000_000
ENV_ROW_BUDGET = "TRACEML_ROW_BUDGET"
#: a budget below this is refused (the tails alone need a few thousand rows)
MIN_ROW_BUDGET = 10_000
#: each rank's last steps held whole at least (the recent diagnosis reads the last 100 after warm-up)
MIN_TAIL_STEPS = 128


def row_budget(value: int | None = None) -> int:
    """The row budget: ``value``, else ``TRACEML_ROW_BUDGET``, else DEFAULT_ROW_BUDGET."""
    if value is None:
        raw = os.environ.get(ENV_ROW_BUDGET, "").strip()
        if not raw:
            return DEFAULT_ROW_BUDGET
        try:
            value = int(raw.replace("_", ""))
        except ValueError:
            raise ConfigError(f"{ENV_ROW_BUDGET}={raw!r}: expected a whole number of rows (e.g. 1000000)") from None
    if value < MIN_ROW_BUDGET:
        raise ConfigError(f"row budget {value:,}: expected at least {MIN_ROW_BUDGET:,} rows ({ENV_ROW_BUDGET})")
    return value


def _warmup(rec: Recording) -> tuple[int, int, int]:
    """(first analysed step number, warm-up steps, distinct steps seen) from the earliest segments."""
    segs = sorted(
        (s for s in rec.segments if any(t == "step_time" for (_, t) in s.rows) and s.step_min is not None),
        key=lambda s: (s.step_min or 0, s.offset),
    )
    seen = np.empty(0, np.int64)
    want = warmup_count(1 << 30) + 1
    for i, seg in enumerate(segs):
        for _, table, cols in rec.read_segment(seg):
            if table == "step_time" and cols:
                idx, _, _ = _rank_rows(cols)
                seen = np.union1d(seen, np.asarray(cols["step"], np.int64)[idx])
        nxt = segs[i + 1].step_min if i + 1 < len(segs) else None
        if len(seen) >= want and (nxt is None or nxt > seen[want - 1]):
            break
    ends = [s.step_max for s in segs if s.step_max is not None]
    distinct = max(len(seen), (max(ends) - int(seen[0]) + 1) if ends and len(seen) else 0)
    warm = warmup_count(distinct)
    below = int(seen[warm]) if warm < len(seen) else (int(seen[-1]) + 1 if len(seen) else 0)
    return below, warm, distinct


def _plan(rec: Recording, total: int, budget: int) -> tuple[int, int]:
    """(tail steps, stride) so that the sample and the tails together hold about ``budget`` rows:
    the tails take at most a quarter of it (and at least MIN_TAIL_STEPS steps, what the recent
    diagnosis reads), the sample the rest."""
    step_rows = 0
    lo: int | None = None
    hi: int | None = None
    for s in rec.segments:
        for (_, t), n in s.rows.items():
            if not is_rollup(t) and rec.schemas.get(t) is not None and "step" in rec.schemas[t].names:
                step_rows += n
        if s.step_min is not None:
            lo = s.step_min if lo is None else min(lo, s.step_min)
        if s.step_max is not None:
            hi = s.step_max if hi is None else max(hi, s.step_max)
    steps = (hi - lo + 1) if lo is not None and hi is not None and hi >= lo else 1
    per_step = step_rows / steps  # rows of every rank and table per step number
    tail = TAIL_STEPS if per_step <= 0 else int(min(TAIL_STEPS, max(MIN_TAIL_STEPS, budget / 4 / per_step)))
    # the rollup of step_time: a row per group of steps and rank, and each rank's open group
    timed = sum(n for s in rec.segments for (_, t), n in s.rows.items() if t == "step_time")
    ranks = len({r for s in rec.segments for (r, t) in s.rows if t == "step_time"})
    rolled = timed // rollup.DEFAULT_ROLLUP_STEPS + ranks * (rollup.DEFAULT_ROLLUP_STEPS + 1)
    room = max(budget - int(tail * per_step) - rolled, budget // 4)
    return tail, sample_stride(total, room)


def data_rows(rec: Recording) -> int:
    """Rows of every data table (rollups left out), from the index."""
    return sum(n for s in rec.segments for (_, t), n in s.rows.items() if not is_rollup(t))


class _Rollup:
    """One rank's ``step_time`` rolled up as it streams (:mod:`traceml.format.rollup`, the writer's
    groups): the closed groups' rows, and the open group's raw rows."""

    def __init__(self, schema: TableSchema) -> None:
        self.schema = schema
        self._done: list[dict[str, np.ndarray]] = []
        self._open: dict[str, np.ndarray] = {}

    def add(self, cols: Mapping[str, np.ndarray]) -> None:
        names = [c.name for c in self.schema.columns]
        if any(n not in cols for n in names):
            return
        merged = {
            k: np.concatenate([self._open[k], np.asarray(cols[k])]) if self._open else np.asarray(cols[k])
            for k in names
        }
        starts = rollup.group_starts(merged["step"], rollup.DEFAULT_ROLLUP_STEPS)
        last = int(starts[-1])
        if last:
            self._done.append(rollup.summarize(self.schema, {k: v[:last] for k, v in merged.items()}, starts[:-1]))
            if len(self._done) > 64:
                self._done = [rollup.concat(self._done)]
        self._open = {k: v[last:].copy() for k, v in merged.items()}

    def size(self) -> int:
        """Rows held: the closed groups' rollup rows and the open group's raw rows."""
        return sum(len(d["step"]) for d in self._done) + len(self._open.get("step", ()))

    def rows(self) -> dict[str, np.ndarray]:
        """Every group's rollup row, the open group's too."""
        tail = rollup.rollup(self.schema, self._open) if self._open else {}
        return rollup.concat([*self._done, tail])


class BoundedBuilder:
    """Feed every batch of a recording (:meth:`add`, file order); :meth:`view` is the bounded view.

    Used by :func:`bounded_view` (one pass over the file) and by terminal replay, which streams
    the same batches into its live store at the same time."""

    def __init__(self, rec: Recording, budget: int | None = None) -> None:
        self._rec = rec
        self.budget = budget = row_budget(budget)
        self.tail, self.stride = _plan(rec, data_rows(rec), budget)
        below, warm, _ = _warmup(rec)
        step_ranks = sorted({r for s in rec.segments for (r, t) in s.rows if t == "step_time"})
        self._digest = StepDigest(step_ranks, warmup_below=below, warmup_steps=warm, stride=self.stride)
        self._samples: dict[str, RowSample] = {}
        #: the step charts' counts and sums per group of steps, exact, whatever the stride
        self._rollups: dict[int, _Rollup] = {}

    def add(self, rank: int, table: str, cols: Mapping[str, np.ndarray]) -> None:
        if is_rollup(table) or not cols:
            return
        if table == "step_time":
            self._digest.add(rank, cols)
            schema = self._rec.schemas.get(table) or STANDARD_TABLES[table]
            if rollup_schema(schema) is not None:
                self._rollups.setdefault(rank, _Rollup(schema)).add(cols)
        self._samples.setdefault(table, RowSample(self.stride, self.tail)).add(rank, cols)

    def held(self) -> int:
        """Rows the sample and the rollups hold now."""
        return sum(s.rows() for s in self._samples.values()) + sum(r.size() for r in self._rollups.values())

    def fit(self) -> None:
        """A file that grew past the plan (``--follow``): double the stride until the sample fits the
        budget again; the totals are unchanged (they count every row)."""
        while self.held() > self.budget and self.stride < 1 << 40:
            self.stride *= 2
            for sample in self._samples.values():
                sample.restride(self.stride)
            self._digest.restride(self.stride)

    def view(self, *, final: bool = True) -> StoreView:
        """The sample, the run's metadata, ranks, attachments and integrity, and the totals.
        ``final=False``: the totals so far of a file still growing (the builder goes on)."""
        rec = self._rec
        store = ColumnStore(capacity=None, meta=rec.meta)
        loaded = {t: s.finish() for t, s in sorted(self._samples.items())}
        for table, per_rank in loaded.items():
            schema = rec.schemas.get(table) or STANDARD_TABLES.get(table)
            if schema is not None:
                store.add_schema(schema)
            for rank, cols in per_rank.items():
                store.append(rank, table, cols, schema)
        for rank, acc in sorted(self._rollups.items()):
            rolled = rollup_schema(acc.schema)
            if rolled is not None:
                store.add_schema(rolled)
                store.append(rank, rolled.name, acc.rows(), rolled)
        rec.fill_end_state(store, loaded)
        totals = self._digest.finish() if final else self._digest.peek()
        return dataclasses.replace(store.snapshot(), digests={STEP_TOTALS: totals})


def bounded_view(rec: Recording, budget: int | None = None) -> StoreView:
    """The recording as a view of at most about ``budget`` rows (every row when they fit)."""
    if data_rows(rec) <= row_budget(budget):
        return rec.view()
    builder = BoundedBuilder(rec, budget)
    for seg in rec.segments:
        if all(is_rollup(t) for (_, t) in seg.rows):
            continue
        for rank, table, cols in rec.read_segment(seg):
            builder.add(rank, table, cols)
    return builder.view()
