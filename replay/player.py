"""Terminal replay: play a recording through the live terminal view, or tail one being written.

Rows are fed in the run's own time order through an injected clock, so the driver draws it as it drew the run.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from rich.console import Console

from replay.engine import END_ATTACHMENTS, Columns, Recording
from replay.tail import Tail
from traceml.errors import ConfigError
from traceml.format import SegmentInfo
from traceml.schema import STANDARD_TABLES, is_rollup
from traceml.store import ColumnStore, RankInfo, StoreView
from traceml.store.view import META_STATUS

#: how often playback moves its clock (the terminal driver redraws on its own clock)
TICK_S = 0.05
#: how often follow mode looks for new records
POLL_S = 0.5

_BOUND = re.compile(r"^\s*(?:(step)\s*[:=]\s*(-?\d+)|(-?\d+(?:\.\d*)?|\.\d+)\s*s?)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Bound:
    """One end of a replay window: ``kind`` "time" (seconds since start) or "step"."""

    kind: str
    value: float

    def __str__(self) -> str:
        return f"step:{int(self.value)}" if self.kind == "step" else f"{self.value:g}s"


def parse_bound(text: str, option: str = "--from") -> Bound:
    """``"90"`` / ``"90s"`` / ``"12.5"`` -> seconds since the start; ``"step:500"`` -> step 500."""
    m = _BOUND.match(text or "")
    if not m:
        raise ConfigError(
            f"{option} {text!r}: expected seconds since the start (e.g. 90 or 12.5) or a step as step:N (e.g. step:500)"
        )
    if m.group(1):
        value = float(int(m.group(2)))
        kind = "step"
    else:
        value = float(m.group(3))
        kind = "time"
    if value < 0:
        raise ConfigError(f"{option} {text!r}: expected a value >= 0")
    return Bound(kind, value)


def parse_speed(text: str | float | None) -> float | None:
    """``1`` / ``10`` / any positive number -> that speed-up; ``max`` -> None (jump to the end)."""
    if text is None:
        return 1.0
    if isinstance(text, str) and text.strip().lower() in ("max", "inf", "end"):
        return None
    try:
        speed = float(text)
    except ValueError as exc:
        raise ConfigError(f"--speed {text!r}: expected 1, 10, another positive number, or max") from exc
    if not (speed > 0 and math.isfinite(speed)):
        raise ConfigError(f"--speed {text!r}: expected a positive number or max")
    return speed


@dataclass(frozen=True)
class Window:
    """Absolute bounds: ``t_lo``/``t_hi`` wall-clock ns and ``step_lo``/``step_hi`` (None = open)."""

    t_lo: int | None = None
    t_hi: int | None = None
    step_lo: int | None = None
    step_hi: int | None = None

    @property
    def whole(self) -> bool:
        return self.t_lo is None and self.t_hi is None and self.step_lo is None and self.step_hi is None


def resolve_window(
    tables: Mapping[str, Mapping[int, Columns]], start_ns: int, lo: Bound | None, hi: Bound | None
) -> Window:
    """Turn ``--from`` / ``--to`` into absolute bounds; step bounds also bound time (for tables without steps)."""
    t_lo = None if lo is None or lo.kind != "time" else start_ns + int(lo.value * 1e9)
    t_hi = None if hi is None or hi.kind != "time" else start_ns + int(hi.value * 1e9)
    s_lo = None if lo is None or lo.kind != "step" else int(lo.value)
    s_hi = None if hi is None or hi.kind != "step" else int(hi.value)
    if s_lo is not None and s_hi is not None and s_hi < s_lo:
        raise ConfigError(f"--to step:{s_hi} is before --from step:{s_lo}")
    if t_lo is not None and t_hi is not None and t_hi < t_lo:
        raise ConfigError(f"--to {hi} is before --from {lo}")
    if s_lo is not None or s_hi is not None:
        # the wall-clock span of the chosen steps, so process and system samples follow them
        starts, ends = [], []
        for cols in tables.get("step_time", {}).values():
            step, ts = cols["step"], cols["ts_ns"]
            keep = np.ones(len(step), dtype=bool)
            if s_lo is not None:
                keep &= step >= s_lo
            if s_hi is not None:
                keep &= step <= s_hi
            if keep.any():
                idx = np.flatnonzero(keep)
                starts.append(int(ts[idx[0]]) - max(int(cols["step_us"][idx[0]]), 0) * 1000)
                ends.append(int(ts[idx[-1]]))
        if s_lo is not None and starts:
            t_lo = max(t_lo, min(starts)) if t_lo is not None else min(starts)
        if s_hi is not None and ends:
            t_hi = min(t_hi, max(ends)) if t_hi is not None else max(ends)
    return Window(t_lo, t_hi, s_lo, s_hi)


def _in_window(cols: Columns, w: Window) -> Columns:
    """Rows inside the window: each side is a step bound (tables with steps) or a time bound."""
    if w.whole or not cols:
        return cols
    n = len(next(iter(cols.values())))
    keep = np.ones(n, dtype=bool)
    has_step = "step" in cols
    for side, step_bound, t_bound in (("lo", w.step_lo, w.t_lo), ("hi", w.step_hi, w.t_hi)):
        if has_step and step_bound is not None:
            values, bound = cols["step"], step_bound
        elif "ts_ns" in cols and t_bound is not None:
            values, bound = cols["ts_ns"], t_bound
        else:
            continue
        keep &= (values >= bound) if side == "lo" else (values <= bound)
    return cols if keep.all() else {k: v[keep] for k, v in cols.items()}


class _Stream:
    __slots__ = ("table", "rank", "cols", "due", "sent", "n")

    def __init__(self, table: str, rank: int, cols: Columns) -> None:
        self.table = table
        self.rank = rank
        self.cols = cols
        self.n = len(next(iter(cols.values()))) if cols else 0
        ts = cols.get("ts_ns")
        # when each row is due: the running max of ts keeps the file's order when ts is not sorted
        self.due = np.maximum.accumulate(ts) if ts is not None and self.n else np.zeros(self.n, dtype=np.int64)
        self.sent = 0


class Playback:
    """Replays a recording into a fresh store, row time by row time.

    A recording within the row budget (``row_budget``, ``TRACEML_ROW_BUDGET``) is loaded first
    and played into an unbounded store: at the end it holds what :meth:`Recording.view` holds.
    A longer one is streamed segment by segment (file order, each opened when the clock reaches
    its first row) into a live store bounded as the aggregator's is; played whole, the same
    pass builds the bounded view (:class:`replay.bounded.BoundedBuilder`) that :meth:`finish`
    returns, so the end state and summary describe the whole run in bounded memory.
    """

    def __init__(
        self, rec: Recording, start: Bound | None = None, end: Bound | None = None, *, row_budget: int | None = None
    ) -> None:
        from replay.bounded import BoundedBuilder, data_rows
        from replay.bounded import row_budget as budget_of

        self.recording = rec
        budget = budget_of(row_budget)
        self.streaming = data_rows(rec) > budget
        self._schemas = rec.schemas
        self._streams: list[_Stream] = []
        self._segments: list[SegmentInfo] = []
        self._builder: BoundedBuilder | None = None
        if not self.streaming:
            tables = rec.load()
            self.window = resolve_window(tables, rec.start_ns, start, end)
            for table, per_rank in sorted(tables.items()):
                for rank, cols in sorted(per_rank.items()):
                    part = _in_window(cols, self.window)
                    s = _Stream(table, rank, part)
                    if s.n:
                        self._streams.append(s)
            dues = [int(s.due[0]) for s in self._streams] + [int(s.due[-1]) for s in self._streams]
            t_first, t_last = (min(dues), max(dues)) if dues else (None, None)
            self._final_infos = rec.rank_infos(tables)
        else:
            steps = [b for b in (start, end) if b is not None and b.kind == "step"]
            step_rows: dict[str, Mapping[int, Columns]] = {}
            if steps:  # the step window's time span: only its rows are read, through the index
                lo = int(start.value) if start is not None and start.kind == "step" else None
                hi = int(end.value) if end is not None and end.kind == "step" else None
                step_rows = {"step_time": rec.columns("step_time", steps=(lo, hi))}
            self.window = resolve_window(step_rows, rec.start_ns, start, end)
            w = self.window
            self._segments = [
                seg
                for seg in rec.segments
                if not all(is_rollup(t) for (_, t) in seg.rows)
                and not (w.t_lo is not None and seg.t_max is not None and seg.t_max < w.t_lo)
                and not (w.t_hi is not None and seg.t_min is not None and seg.t_min > w.t_hi)
            ]
            t_mins = [seg.t_min for seg in self._segments if seg.t_min is not None]
            t_maxs = [seg.t_max for seg in self._segments if seg.t_max is not None]
            t_first = min(t_mins) if t_mins else None
            t_last = max(t_maxs) if t_maxs else None
            self._final_infos = rec.rank_infos()
            if w.whole:
                self._builder = BoundedBuilder(rec, budget)
        self.t_begin = (
            self.window.t_lo if self.window.t_lo is not None else (t_first if t_first is not None else rec.start_ns)
        )
        self.t_end = t_last if t_last is not None else self.t_begin
        if self.window.t_hi is not None:
            self.t_end = min(self.t_end, self.window.t_hi)
        self.t_end = max(self.t_end, self.t_begin)
        meta = rec.meta
        self._final_status = meta[META_STATUS]
        live_meta = {**meta, META_STATUS: "running"}
        self.store = ColumnStore(capacity=None, meta=live_meta) if not self.streaming else ColumnStore(meta=live_meta)
        for name, data in rec.attachments.items():
            if name not in END_ATTACHMENTS:
                self.store.attach(name, data)
        self.store.set_integrity(rec.integrity)
        self.now_ns = self.t_begin
        self.finished = False

    @property
    def duration_s(self) -> float:
        return (self.t_end - self.t_begin) / 1e9

    def advance_to(self, t_ns: float) -> int:
        """Append every row due by ``t_ns``; returns how many."""
        appeared: list[int] = []
        added = self._drain(t_ns, appeared)
        while self._segments and (self._segments[0].t_min is None or self._segments[0].t_min <= t_ns):
            self._open(self._segments.pop(0))  # one segment at a time: its rows drain before the next is read
            added += self._drain(t_ns, appeared)
        for rank in appeared:
            current = self.store.rank_info(rank)
            if current is None or current.state == "unknown":
                final = self._final_infos.get(rank, RankInfo(rank=rank))
                self.store.set_rank(replace(final, state="connected", exit_status="", died_ns=0))
        self.now_ns = int(max(self.now_ns, min(t_ns, self.t_end)))
        return added

    def _open(self, seg: SegmentInfo) -> None:
        for rank, table, cols in self.recording.read_segment(seg):
            if is_rollup(table) or not cols:
                continue
            if self._builder is not None:
                self._builder.add(rank, table, cols)
            stream = _Stream(table, rank, _in_window(cols, self.window))
            if stream.n:
                self._streams.append(stream)

    def _drain(self, t_ns: float, appeared: list[int]) -> int:
        added = 0
        for s in self._streams:
            if s.sent >= s.n:
                continue
            upto = s.n if t_ns >= s.due[-1] else int(np.searchsorted(s.due, t_ns, side="right"))
            if upto > s.sent:
                if s.sent == 0 and s.rank not in appeared:
                    appeared.append(s.rank)
                part = {k: v[s.sent : upto] for k, v in s.cols.items()}
                self.store.append(s.rank, s.table, part, self._schemas.get(s.table) or STANDARD_TABLES.get(s.table))
                added += upto - s.sent
                s.sent = upto
        if self.streaming:  # what was played is in the store: let the segment's arrays go
            self._streams = [s for s in self._streams if s.sent < s.n]
        return added

    @property
    def done(self) -> bool:
        return not self._segments and all(s.sent >= s.n for s in self._streams)

    def finish(self) -> StoreView:
        """Everything appended, the run's end state (rank table, exit, summary, status) set.
        A long recording played whole ends on its bounded view (totals, sketches, a sample)."""
        self.advance_to(math.inf)
        for info in self._final_infos.values():
            self.store.set_rank(info)
        for name in END_ATTACHMENTS:
            if name in self.recording.attachments:
                self.store.attach(name, self.recording.attachments[name])
        self.store.set_meta(**{META_STATUS: self._final_status})
        self.finished = True
        if self._builder is not None:
            return self._builder.view()
        return self.store.snapshot()

    def snapshot(self) -> StoreView:
        return self.store.snapshot()


def print_end_state(view: StoreView, console: Console, *, final: bool = True) -> None:
    """The live view of ``view`` printed once (``--speed max``), then the end-of-run summary."""
    from traceml.drivers.terminal import print_final
    from traceml.renderers.terminal import render_live
    from traceml.views import live_model

    console.print(render_live(live_model(view)))
    if final:
        print_final(view, console)


def play(
    rec: Recording,
    *,
    speed: float | None,
    start: Bound | None = None,
    end: Bound | None = None,
    console: Console | None = None,
    refresh_s: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Any] = time.sleep,
) -> StoreView:
    """Play ``rec`` through the live terminal view at ``speed`` (None = jump to the end).  Returns the end view."""
    from traceml.drivers.terminal import TerminalDriver

    console = console or Console()
    playback = Playback(rec, start, end)
    if speed is None:
        view = playback.finish()
        print_end_state(view, console)
        return view
    driver = TerminalDriver(playback.snapshot, console=console, refresh_s=refresh_s)
    driver.start()
    interrupted = False
    try:
        began = clock()
        while True:
            t = playback.t_begin + (clock() - began) * speed * 1e9
            playback.advance_to(t)
            if t >= playback.t_end:
                break
            sleep(min(TICK_S, max((playback.t_end - t) / 1e9 / speed, 0.001)))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        view = playback.snapshot() if interrupted else playback.finish()
        driver.stop(final_view=view)
    return view


def follow(
    rec: Recording,
    *,
    console: Console | None = None,
    poll_s: float = POLL_S,
    refresh_s: float = 0.5,
    stop: threading.Event | None = None,
    row_budget: int | None = None,
) -> StoreView:
    """Tail a recording being written: draw the live view until the file gets its footer, Ctrl-C, or ``stop``.
    Memory stays within ``row_budget`` rows (``TRACEML_ROW_BUDGET``) however long the file grows
    (:class:`replay.tail.Tail`); the end view is the one ``replay`` shows of the finished file."""
    from traceml.drivers.terminal import TerminalDriver

    console = console or Console()
    tail = Tail(rec, budget=row_budget)
    driver = TerminalDriver(tail.latest, console=console, refresh_s=refresh_s)
    driver.start()
    stop = stop or threading.Event()
    try:
        while not tail.finished and not stop.is_set():
            stop.wait(poll_s)
            tail.poll()
    except KeyboardInterrupt:
        pass
    finally:
        view = tail.finish()
        driver.stop(final_view=view)
    return view
