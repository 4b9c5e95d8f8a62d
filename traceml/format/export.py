"""Turn a recording into files other tools open: CSV per table, Chrome trace-event JSON.

The Chrome trace has one process per rank and places phases where STEP_TIMELINE says they started.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from traceml import escape as esc
from traceml.errors import FormatError
from traceml.format.reader import TmlReader
from traceml.outpaths import OutputDir, open_new_file
from traceml.schema import PHASES, TIMELINE_PHASES, phase_starts


def export_csv(
    reader: TmlReader, out_dir: str | os.PathLike[str], *, overwrite: bool = False
) -> list[tuple[str, Path]]:
    """Write one CSV per table with rows (a ``rank`` column first) into ``out_dir``, streaming.

    Rows are written as the recording is read, segment by segment (``TmlReader.iter_batches``):
    memory stays at one segment's rows whatever the length of the run, and rows come in the
    recording's order (each rank's rows in step order; ranks interleaved by time).

    Returns ``(table, path)`` pairs.  The file name comes from :func:`traceml.outpaths.safe_filename`
    (a hostile table name cannot leave ``out_dir``); existing files are refused unless ``overwrite``,
    before anything is written.
    """
    out = OutputDir(out_dir, overwrite=overwrite, option="-o")
    tables = {table: out.claim(table, ".csv") for table in reader.tables}
    out.check(tables.values())
    files: dict[str, tuple[IO[str], Any, list[str]]] = {}
    try:
        for rank, table, cols in reader.iter_batches():
            path = tables.get(table)
            if path is None or not cols:
                continue
            try:
                if table not in files:
                    f = out.open(path, "w", newline="", encoding="utf-8")
                    files[table] = (f, csv.writer(f), list(cols))
                    files[table][1].writerow(["rank", *cols])
                _, writer, names = files[table]
                if list(cols) != names:
                    continue  # a segment whose columns differ from the table's (the reader reports it)
                lists = [cols[name].tolist() for name in names]
                writer.writerows([rank, *row] for row in zip(*lists, strict=True))
            except OSError as exc:
                raise FormatError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        for f, _, _ in files.values():
            f.close()
    return [(table, path) for table, path in tables.items() if table in files]


#: a trace above this many bytes gets a warning: Perfetto in a browser tab struggles past it
CHROME_TRACE_WARN_BYTES = 256 * 2**20
#: longest name (rank, host, region) written into a trace
TRACE_NAME_CHARS = 80
#: the thread tracks of a rank's process
TID_STEPS, TID_REGIONS = 0, 1

PLACED = "recorded"
END_TO_END = (
    "end to end: this recording has no step_timeline (written before phase starts were recorded), "
    "so each step's phases are laid end to end in a fixed order, not where they ran"
)


def _name(value: object) -> str:
    return esc.visible(value, TRACE_NAME_CHARS)


def parse_steps(spec: str | None) -> tuple[int | None, int | None]:
    """``--steps A:B`` -> (A, B): steps A to B-1, as a Python slice; either side may be empty."""
    if spec is None:
        return None, None
    text = spec.strip()
    first, sep, last = text.partition(":")
    try:
        if not sep:
            raise ValueError(text)
        lo = int(first) if first.strip() else None
        hi = int(last) if last.strip() else None
    except ValueError:
        raise FormatError(
            f"--steps {spec!r}: expected A:B (steps A to B-1, either side may be left out, e.g. 100:200 or 500:)"
        ) from None
    if lo is not None and hi is not None and hi <= lo:
        raise FormatError(f"--steps {spec!r}: the window is empty ({hi} <= {lo}); expected A:B with B > A")
    return lo, hi


def _rank_names(reader: TmlReader) -> dict[int, str]:
    names: dict[int, str] = {}
    for key, value in reader.attachments.items():
        if not key.startswith("environment/rank") or not isinstance(value, dict):
            continue
        try:
            rank = int(key.removeprefix("environment/rank"))
        except ValueError:
            continue
        host = value.get("host")
        if isinstance(host, str) and host:
            names[rank] = f"rank {rank} ({_name(host)})"
    return names


#: the tables a trace draws from
_TRACE_STEP_TABLES = ("step_time", "step_timeline", "step_region")
_TRACE_COUNTER_TABLES = ("process", "system", "system_gpu", "step_memory")
#: steps of one rank turned into events at a time: what the trace holds in memory at once
WINDOW_STEPS = 10_000
#: counter rows (of one rank and table) turned into events at a time, about
WINDOW_COUNTER_ROWS = 20_000


def chrome_trace(reader: TmlReader, steps: tuple[int | None, int | None] = (None, None)) -> dict[str, Any]:
    """The recording as a Chrome trace-event document (times in µs from the first step's start).

    Per rank (a process, named after the rank and its host): a ``steps`` track with each step and
    its phases -- where they ran when the recording has ``step_timeline``, else end to end (the
    document's ``otherData.phases`` says which) -- a ``regions`` track with the ``trace_time``
    regions, and counters (process CPU and RSS; per node CPU, RAM and GPUs; per-step memory
    peaks).  ``steps`` = (A, B) keeps steps A to B-1 and the counters of that time span.
    In memory: :func:`write_chrome_trace` writes the same document without holding it.
    """
    events: list[dict[str, Any]] = []
    trace = _Trace(reader, steps)
    for chunk in trace.chunks():
        events.extend(chunk)
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": trace.other()}


class _Trace:
    """The trace of a recording, rank by rank and window of steps by window (bounded memory)."""

    def __init__(self, reader: TmlReader, steps: tuple[int | None, int | None]) -> None:
        self.reader = reader
        self.lo, self.hi = steps
        tables = set(reader.tables)
        self.step_tables = [t for t in _TRACE_STEP_TABLES if t in tables]
        self.counter_tables = [t for t in _TRACE_COUNTER_TABLES if t in tables]
        wanted = set(self.step_tables) | set(self.counter_tables)
        self.ranks = sorted({r for seg in reader.segments for (r, t) in seg.rows if t in wanted})
        self.names = _rank_names(reader)
        self.placements: set[str] = set()
        self.origin, self.window = self._spans()

    def _step_windows(self, rank: int, tables: Sequence[str]) -> Iterator[dict[str, dict[str, Any]]]:
        """The rank's rows of *tables*, WINDOW_STEPS steps at a time (segments outside skipped)."""
        segs = [s for s in self.reader.segments if any((rank, t) in s.rows for t in tables)]
        lows = [s.step_min for s in segs if s.step_min is not None]
        highs = [s.step_max for s in segs if s.step_max is not None]
        if not lows or not highs:
            return
        first, last = min(lows), max(highs)
        for a in range(first, last + 1, WINDOW_STEPS):
            b = min(a + WINDOW_STEPS - 1, last)
            yield {
                t: cols
                for t in tables
                if (cols := self.reader.read_table(t, [rank], step_range=(a, b)).get(rank)) is not None
            }

    def _counter_windows(self, rank: int, table: str) -> Iterator[dict[str, Any]]:
        """The rank's rows of the counter *table*, about WINDOW_COUNTER_ROWS at a time: windows of
        time that start where a segment starts (``[start_k, start_k+1 - 1]``), so each row is read once."""
        segs = sorted(
            (s for s in self.reader.segments if (rank, table) in s.rows and s.t_min is not None),
            key=lambda s: s.t_min or 0,
        )
        starts: list[int] = []
        held = WINDOW_COUNTER_ROWS
        for seg in segs:
            if held >= WINDOW_COUNTER_ROWS:
                starts.append(seg.t_min or 0)
                held = 0
            held += seg.rows[(rank, table)]
        for i, a in enumerate(starts):
            b = starts[i + 1] - 1 if i + 1 < len(starts) else None
            if b is not None and b < a:
                continue  # two windows starting at the same ns: the later one reads its rows
            cols = self.reader.read_table(table, [rank], time_range=(a, b)).get(rank)
            if cols is not None:
                yield cols

    def _spans(self) -> tuple[int, tuple[int, int] | None]:
        """The origin (the first step start or sample) and, for --steps, the kept steps' time span."""
        origins: list[int] = []
        first: int | None = None
        last: int | None = None
        for rank in self.ranks:
            if "step_time" in self.step_tables:
                for window in self._step_windows(rank, ["step_time"]):
                    st = {rank: window["step_time"]} if "step_time" in window else {}
                    origins.append(_origin_ns(st, {}))
                    span = _window_ns(st, self.lo, self.hi)
                    if span is not None and span[0] <= span[1]:
                        first = span[0] if first is None else min(first, span[0])
                        last = span[1] if last is None else max(last, span[1])
            for table in self.counter_tables:
                for cols in self._counter_windows(rank, table):
                    origins.append(_origin_ns({}, {table: {rank: cols}}))
        origin = min((o for o in origins if o > 0), default=0)
        if self.lo is None and self.hi is None:
            return origin, None
        return origin, (first, last) if first is not None and last is not None else (0, -1)

    def chunks(self) -> Iterator[list[dict[str, Any]]]:
        for rank in self.ranks:
            events: list[dict[str, Any]] = [
                {
                    "name": "process_name",
                    "ph": "M",
                    "pid": rank,
                    "args": {"name": self.names.get(rank, f"rank {rank}")},
                },
                {"name": "process_sort_index", "ph": "M", "pid": rank, "args": {"sort_index": rank}},
                {"name": "thread_name", "ph": "M", "pid": rank, "tid": TID_STEPS, "args": {"name": "steps"}},
            ]
            regions_named = False
            for window in self._step_windows(rank, self.step_tables):
                step_time = window.get("step_time")
                if step_time is not None:
                    placed = _step_slices(
                        events, rank, step_time, window.get("step_timeline"), self.origin, self.lo, self.hi
                    )
                    self.placements.add(PLACED if placed else END_TO_END)
                if "step_region" in window:
                    before = len(events)
                    _region_slices(events, rank, window["step_region"], step_time, self.origin, self.lo, self.hi)
                    named = [i for i in range(before, len(events)) if events[i]["ph"] == "M"]
                    if regions_named:  # one "regions" track name per rank, not one per window
                        for i in reversed(named):
                            del events[i]
                    regions_named = regions_named or bool(named)
                yield events
                events = []
            yield events
            for table in self.counter_tables:
                for cols in self._counter_windows(rank, table):
                    events = []
                    _counters(events, rank, table, cols, self.origin, self.window)
                    yield events

    def other(self) -> dict[str, Any]:
        other = {
            "run_id": _name(self.reader.header.get("run_id", "")),
            "source": _name(self.reader.path.name),
            "ts_origin_ns": self.origin,
            "phases": " / ".join(sorted(self.placements)) if self.placements else PLACED,
        }
        if self.lo is not None or self.hi is not None:
            other["steps"] = f"{'' if self.lo is None else self.lo}:{'' if self.hi is None else self.hi}"
        return other


def write_chrome_trace(
    reader: TmlReader,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    gzip_output: bool = True,
    steps: tuple[int | None, int | None] = (None, None),
) -> Path:
    """Write the trace to ``path`` (gzipped unless ``gzip_output`` is False; Perfetto opens
    ``.json.gz`` as it is), rank by rank and window by window.  Returns the path written."""
    out = Path(path)
    trace = _Trace(reader, steps)
    try:
        with open_new_file(out, "wb", overwrite=overwrite, option="-o") as opened:
            raw: Any = opened  # binary: opened with "wb"
            if gzip_output:
                with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
                    _dump(trace, gz)
            else:
                _dump(trace, raw)
    except OSError as exc:
        raise FormatError(f"cannot write {out}: {exc.strerror or exc}") from exc
    return out


def _dump(trace: _Trace, f: Any) -> None:
    """Write the document as compact JSON, the events encoded in chunks by the C encoder (json.dump
    would write token by token: ~8x slower, and far slower still through gzip)."""
    sep = (",", ":")
    f.write(b'{"traceEvents":[')
    first = True
    for events in trace.chunks():
        for i in range(0, len(events), _CHUNK_EVENTS):
            if not first:
                f.write(b",")
            first = False
            f.write(json.dumps(events[i : i + _CHUNK_EVENTS], separators=sep, allow_nan=False)[1:-1].encode("utf-8"))
    rest = {"displayTimeUnit": "ms", "otherData": trace.other()}
    f.write(b"],")
    f.write(json.dumps(rest, separators=sep, allow_nan=False)[1:].encode("utf-8"))


#: events per json.dumps call when writing a trace
_CHUNK_EVENTS = 8192


def _origin_ns(step_time: dict[int, dict[str, Any]], counters: dict[str, dict[int, dict[str, Any]]]) -> int:
    starts = []
    for cols in step_time.values():
        if len(cols["ts_ns"]):
            ok = (cols["ts_ns"] > 0) & (cols["step_us"] > 0)
            if ok.any():
                starts.append(int((cols["ts_ns"][ok] - cols["step_us"][ok] * 1000).min()))
    for by_rank in counters.values():
        for cols in by_rank.values():
            ts = cols.get("ts_ns")
            if ts is not None and len(ts) and (ts > 0).any():
                starts.append(int(ts[ts > 0].min()))
    return min(starts) if starts else 0


def _window_ns(step_time: dict[int, dict[str, Any]], lo: int | None, hi: int | None) -> tuple[int, int] | None:
    """The wall-clock span (ns) of the steps kept, for the counters; None = everything."""
    if lo is None and hi is None:
        return None
    first, last = None, None
    for cols in step_time.values():
        keep = _keep(cols["step"], lo, hi) & (cols["ts_ns"] > 0)
        if keep.any():
            s = int((cols["ts_ns"][keep] - cols["step_us"][keep] * 1000).min())
            e = int(cols["ts_ns"][keep].max())
            first = s if first is None else min(first, s)
            last = e if last is None else max(last, e)
    return (first, last) if first is not None and last is not None else (0, -1)


def _keep(step: np.ndarray, lo: int | None, hi: int | None) -> np.ndarray:
    keep = np.ones(len(step), dtype=bool)
    if lo is not None:
        keep &= step >= lo
    if hi is not None:
        keep &= step < hi
    return keep


def _us(ns: int, origin: int) -> float | int:
    """µs from the origin: an integer when whole (fewer bytes), else to the ns."""
    d = ns - origin
    return d // 1000 if d % 1000 == 0 else round(d / 1000.0, 3)


def _step_slices(
    events: list[dict[str, Any]],
    rank: int,
    cols: dict[str, Any],
    timeline: dict[str, Any] | None,
    origin: int,
    lo: int | None,
    hi: int | None,
) -> bool:
    """Append the rank's step and phase slices; True when the phases are placed where they ran."""
    placed = timeline is not None and len(timeline.get("step", ())) > 0
    starts: dict[int, list[int]] = {}
    if placed and timeline is not None:
        names = [f"{p}_gap_us" for p in TIMELINE_PHASES]
        lists = [timeline[n].tolist() if n in timeline else [0] * len(timeline["step"]) for n in names]
        for i, step in enumerate(timeline["step"].tolist()):
            starts[step] = [col[i] for col in lists]  # gaps, turned into starts below
    phase_lists = [(phase, cols[f"{phase}_us"].tolist()) for phase in PHASES if f"{phase}_us" in cols]
    durations = [cols[f"{p}_us"].tolist() if f"{p}_us" in cols else [0] * len(cols["step"]) for p in TIMELINE_PHASES]
    failed = cols["failed"].tolist() if "failed" in cols else [0] * len(cols["step"])
    keep = _keep(cols["step"], lo, hi).tolist()
    for i, (step, ts_ns, step_us) in enumerate(
        zip(cols["step"].tolist(), cols["ts_ns"].tolist(), cols["step_us"].tolist(), strict=True)
    ):
        if step_us <= 0 or ts_ns <= 0 or not keep[i]:
            continue  # not measured, or outside the window
        start_ns = ts_ns - step_us * 1000
        start = _us(start_ns, origin)
        args: dict[str, Any] = {"step": step}
        if failed[i]:
            args["failed"] = True
        events.append(
            {"name": "step", "ph": "X", "pid": rank, "tid": TID_STEPS, "ts": start, "dur": step_us, "args": args}
        )
        gaps = starts.get(step)
        offsets = phase_starts([d[i] for d in durations], gaps) if gaps is not None else None
        cursor = 0
        for phase, values in phase_lists:
            dur = values[i]
            if dur <= 0:
                continue
            if offsets is not None and phase != "residual":
                at = offsets[TIMELINE_PHASES.index(phase)]
                if at < 0:
                    continue
            elif offsets is not None:
                continue  # residual is what the placed phases leave: the gaps between them
            else:
                at = cursor
                cursor += dur
            dur = min(dur, step_us - at)  # phases never run past their step
            if dur <= 0:
                continue
            events.append(
                {
                    "name": phase,
                    "ph": "X",
                    "pid": rank,
                    "tid": TID_STEPS,
                    "ts": _us(start_ns + at * 1000, origin),
                    "dur": dur,
                }
            )
    return placed


def _region_slices(
    events: list[dict[str, Any]],
    rank: int,
    cols: dict[str, Any],
    step_cols: dict[str, Any] | None,
    origin: int,
    lo: int | None,
    hi: int | None,
) -> None:
    step_start: dict[int, int] = {}
    if step_cols is not None:
        for step, ts_ns, step_us in zip(
            step_cols["step"].tolist(), step_cols["ts_ns"].tolist(), step_cols["step_us"].tolist(), strict=True
        ):
            step_start[step] = ts_ns - step_us * 1000
    offsets = cols["start_us"].tolist() if "start_us" in cols else [-1] * len(cols["step"])
    added = False
    for step, ts_ns, name, cpu_us, calls, at in zip(
        cols["step"].tolist(),
        cols["ts_ns"].tolist(),
        cols["name"],
        cols["cpu_us"].tolist(),
        cols["calls"].tolist(),
        offsets,
        strict=True,
    ):
        if step >= 0 and ((lo is not None and step < lo) or (hi is not None and step >= hi)):
            continue
        if step < 0 and (lo is not None or hi is not None):
            continue  # regions outside any step have no place in a window of steps
        if step >= 0 and at >= 0 and step in step_start:
            start_ns = step_start[step] + at * 1000
        elif step >= 0 and step in step_start:
            start_ns = step_start[step]  # no recorded start (an older file): at its step's start
        else:
            start_ns = ts_ns - cpu_us * 1000  # outside a step: the row is written when the call ends
        if start_ns <= 0:
            continue
        args = {"step": step, "calls": calls} if step >= 0 else {}
        events.append(
            {
                "name": _name(name),
                "ph": "X",
                "pid": rank,
                "tid": TID_REGIONS,
                "ts": _us(start_ns, origin),
                "dur": max(cpu_us, 0),
                "args": args,
            }
        )
        added = True
    if added:
        events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": TID_REGIONS, "args": {"name": "regions"}})


#: counters per table: (column, counter name, series key, scale)
_COUNTERS: dict[str, tuple[tuple[str, str, str, float], ...]] = {
    "process": (
        ("cpu_pct", "process cpu %", "cpu", 1.0),
        ("rss_bytes", "process rss MiB", "rss", 1 / 2**20),
        ("gpu_alloc_bytes", "gpu allocated MiB", "alloc", 1 / 2**20),
    ),
    "system": (("cpu_pct", "node cpu %", "cpu", 1.0), ("ram_used_bytes", "node ram used MiB", "used", 1 / 2**20)),
    "system_gpu": (
        ("util_pct", "util %", "util", 1.0),
        ("mem_used_bytes", "mem used MiB", "used", 1 / 2**20),
        ("power_w", "power W", "W", 1.0),
    ),
    "step_memory": (("peak_alloc_bytes", "step peak allocated MiB", "peak", 1 / 2**20),),
}


def _counters(
    events: list[dict[str, Any]],
    rank: int,
    table: str,
    cols: dict[str, Any],
    origin: int,
    window: tuple[int, int] | None,
) -> None:
    ts = cols.get("ts_ns")
    if ts is None:
        return
    ts_list = ts.tolist()
    gpu = cols["gpu_idx"].tolist() if table == "system_gpu" and "gpu_idx" in cols else None
    for column, label, key, scale in _COUNTERS[table]:
        if column not in cols:
            continue
        for i, (t, v) in enumerate(zip(ts_list, cols[column].tolist(), strict=True)):
            if t <= 0 or (window is not None and not window[0] <= t <= window[1]):
                continue
            if isinstance(v, float) and math.isnan(v) or v < 0:
                continue  # not measured
            name = f"gpu{gpu[i]} {label}" if gpu is not None else label
            value = round(v * scale, 3)
            events.append({"name": name, "ph": "C", "pid": rank, "ts": _us(t, origin), "args": {key: value}})
