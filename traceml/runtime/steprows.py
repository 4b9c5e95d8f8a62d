"""The rank's ``step_time`` table: one packed raw row per step in, STEP_TIME and STEP_TIMELINE columns out.

The training thread appends one ``bytes`` of :data:`ROW` per step (not tracked by the GC); all else runs on
the sender thread.
"""

from __future__ import annotations

import struct
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from traceml.schema import STEP_TIME, STEP_TIMELINE, TIMELINE_PHASES, TableSchema, phase_gaps, phase_starts
from traceml.store import BoundedTable

#: ``(step, failed, start, end, dataloader, h2d, forward, backward, optimizer, first start of each
#: of the five phases)``, all ``perf_counter_ns`` except step and failed (0: the phase did not run)
ROW = struct.Struct("14q")  # native: the rows never leave the process, and native packs fastest
#: packs one raw row (what the training thread calls, once per step)
pack_row = ROW.pack

_perf_ns = time.perf_counter_ns
_wall_ns = time.time_ns
_sleep = time.sleep
#: past the high-water mark (steps faster than the sender drains, e.g. an empty loop), the
#: training thread hands the GIL to the sender for YIELD_S every YIELD_EVERY rows: rows are
#: drained instead of lost (the C fast path does the same, _fastclock.c); a normal loop never
#: gets there
YIELD_EVERY = 64
YIELD_S = 20e-6


def raw_array(rows: Sequence[Any]) -> np.ndarray:
    """The raw rows as an ``(n, 14)`` int64 array (packed rows, or tuples of 14 ints)."""
    packed = b"".join(r if type(r) is bytes else pack_row(*r) for r in rows)
    return np.frombuffer(packed, dtype=np.int64).reshape(len(rows), 14).astype(np.int64)


class StepRows(BoundedTable):
    """The STEP_TIME table of the rank, fed raw by :class:`~traceml.runtime.step.StepTracker`.

    A raw row is :data:`ROW` packed (a tuple of the same 14 ints is accepted too).
    :meth:`take_tables` turns the rows taken into STEP_TIME and STEP_TIMELINE columns with numpy
    on the sender thread (the wall clock of ``end`` read from the offset between the
    two clocks at that moment); :meth:`recent` returns STEP_TIME tuples.
    """

    __slots__ = ("_popped", "_kept")

    def __init__(self, capacity: int = 4096, keep_recent: int = 256) -> None:
        super().__init__(STEP_TIME, capacity)
        self._popped = 0
        #: the last rows taken, still there for :meth:`recent`
        self._kept: deque[Sequence[Any]] = deque(maxlen=max(1, keep_recent))

    def append(self, row: Any) -> None:
        # one writer (the training thread); no lock: deque.append is atomic, and the rows taken
        # leave the deque, so appending evicts nothing (and frees nothing) while the sender keeps up
        # (StepTracker.__exit__ does the same inline)
        rows = self._rows
        rows.append(row)
        self.appended += 1
        n = len(rows)
        if n == self._high_water:
            self.wake()
        elif n > self._high_water and not self.appended % YIELD_EVERY:  # every 64th row at most
            _sleep(YIELD_S)  # the sender is behind: let it drain (see YIELD_EVERY)

    def wake(self) -> None:
        """Half full: wake the sender (a failing callback is dropped)."""
        if self.on_high_water is not None:
            try:
                self.on_high_water()
            except Exception:
                self.on_high_water = None

    def take_unsent(self) -> list[Sequence[Any]]:
        rows = self._rows
        out: list[Sequence[Any]] = []
        pop = rows.popleft
        try:
            while True:
                out.append(pop())
        except IndexError:
            pass
        with self._lock:
            self._popped += len(out)
            # rows the deque evicted before they were taken (the counter may lag one append behind)
            self.lost = max(self.lost, self.appended - self._popped - len(rows))
            self._taken = self.appended
            self._kept.extend(out[-self._kept.maxlen :] if self._kept.maxlen else out)
        return out

    @staticmethod
    def convert(rows: Sequence[Sequence[Any]]) -> dict[str, tuple[TableSchema, dict[str, Any]]]:
        if not rows:
            return {}
        raw = raw_array(rows)
        wall_minus_perf = _wall_ns() - _perf_ns()
        start, end = raw[:, 2], raw[:, 3]
        phases_us = raw[:, 4:9] // 1000
        step_us = (end - start) // 1000
        residual = np.maximum(step_us - phases_us.sum(axis=1), 0)
        first = raw[:, 9:14]
        starts = np.where(first > 0, np.maximum((first - start[:, None]) // 1000, 0), -1)
        gaps = phase_gaps(list(phases_us.T), list(starts.T))
        step = raw[:, 0].copy()
        st = {"step": step, "ts_ns": end + wall_minus_perf, "failed": raw[:, 1].astype(np.uint8), "step_us": step_us}
        for i, name in enumerate(STEP_TIME.names[4:9]):
            st[name] = np.ascontiguousarray(phases_us[:, i])
        st["residual_us"] = residual
        tl = {"step": step}
        for i, name in enumerate(STEP_TIMELINE.names[1:]):
            tl[name] = np.ascontiguousarray(gaps[i], dtype=np.int64)
        return {STEP_TIME.name: (STEP_TIME, st), STEP_TIMELINE.name: (STEP_TIMELINE, tl)}

    def take_tables(self) -> dict[str, tuple[TableSchema, dict[str, Any]]]:
        """STEP_TIME and STEP_TIMELINE columns of the rows appended since the last take."""
        return self.convert(self.take_unsent())

    def _recent_raw(self, n: int | None) -> list[Sequence[Any]]:
        with self._lock:
            raw = [*self._kept, *self._rows]
        return raw if n is None else raw[-n:]

    def recent(self, n: int | None = None) -> list[Sequence[Any]]:
        """The last ``n`` STEP_TIME rows held (taken ones: the last ``keep_recent``)."""
        return self._as_rows(self._recent_raw(n), STEP_TIME)

    def recent_timeline(self, n: int | None = None) -> list[Sequence[Any]]:
        """The last ``n`` STEP_TIMELINE rows (for local inspection and tests)."""
        return self._as_rows(self._recent_raw(n), STEP_TIMELINE)

    def recent_starts(self, n: int | None = None) -> list[dict[str, int]]:
        """The last ``n`` steps' phase start offsets (µs, -1: did not run), by phase name."""
        got = self.convert(self._recent_raw(n))
        if not got:
            return []
        st, tl = got[STEP_TIME.name][1], got[STEP_TIMELINE.name][1]
        durations = [st[f"{p}_us"] for p in TIMELINE_PHASES]
        starts = phase_starts(durations, [tl[f"{p}_gap_us"] for p in TIMELINE_PHASES])
        return [dict(zip(TIMELINE_PHASES, (int(c[i]) for c in starts), strict=True)) for i in range(len(st["step"]))]

    def _as_rows(self, raw: Sequence[Sequence[Any]], schema: TableSchema) -> list[Sequence[Any]]:
        got = self.convert(raw)
        if not got:
            return []
        cols = got[schema.name][1]
        return list(zip(*(cols[name].tolist() for name in schema.names), strict=True))
