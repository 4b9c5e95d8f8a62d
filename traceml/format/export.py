"""Turn a recording into files other tools open: CSV per table, Chrome trace-event JSON.

The Chrome trace (Perfetto, chrome://tracing) has one process track per rank; each step is
a slice ending at its ``ts_ns`` and lasting ``step_us``, with the phases of STEP_TIME laid
end to end inside it, and process samples as counters.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

from traceml.errors import FormatError
from traceml.format.reader import TmlReader
from traceml.outpaths import OutputDir, open_new_file
from traceml.schema import PHASES


def export_csv(
    reader: TmlReader, out_dir: str | os.PathLike[str], *, overwrite: bool = False
) -> list[tuple[str, Path]]:
    """Write one CSV per table with rows (a ``rank`` column first) into ``out_dir``.

    Returns ``(table, path)`` pairs.  The file name comes from :func:`traceml.outpaths.safe_filename`
    (a hostile table name cannot leave ``out_dir``); existing files are refused unless ``overwrite``,
    before anything is written.
    """
    out = OutputDir(out_dir, overwrite=overwrite, option="-o")
    tables = [(table, out.claim(table, ".csv")) for table in reader.tables]
    out.check(path for _, path in tables)
    written = []
    for table, path in tables:
        data = reader.read_table(table)
        if not data:
            continue
        names = list(next(iter(data.values())))
        with out.open(path, "w", newline="", encoding="utf-8") as f:
            try:
                writer = csv.writer(f)
                writer.writerow(["rank", *names])
                for rank, cols in data.items():
                    lists = [cols[name].tolist() for name in names]
                    writer.writerows([rank, *row] for row in zip(*lists, strict=True))
            except OSError as exc:
                raise FormatError(f"cannot write {path}: {exc.strerror or exc}") from exc
        written.append((table, path))
    return written


def chrome_trace(reader: TmlReader) -> dict[str, Any]:
    """The recording as a Chrome trace-event document (times in microseconds)."""
    events: list[dict[str, Any]] = []
    steps = reader.read_table("step_time") if "step_time" in reader.tables else {}
    process = reader.read_table("process") if "process" in reader.tables else {}
    for rank in sorted(set(steps) | set(process)):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": f"rank {rank}"}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": rank, "tid": 0, "args": {"sort_index": rank}})
        events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": "steps"}})
        if rank in steps:
            events.extend(_step_slices(rank, steps[rank]))
        if rank in process:
            events.extend(_process_counters(rank, process[rank]))
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"run_id": reader.header.get("run_id", ""), "source": str(reader.path)},
    }


def write_chrome_trace(reader: TmlReader, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    out = Path(path)
    document = chrome_trace(reader)
    try:
        with open_new_file(out, "w", overwrite=overwrite, option="-o", encoding="utf-8") as f:
            json.dump(document, f, separators=(",", ":"), allow_nan=False)
    except OSError as exc:
        raise FormatError(f"cannot write {out}: {exc.strerror or exc}") from exc
    return out


def _step_slices(rank: int, cols: dict[str, Any]) -> list[dict[str, Any]]:
    events = []
    phase_lists = [(phase, cols[f"{phase}_us"].tolist()) for phase in PHASES if f"{phase}_us" in cols]
    failed = cols["failed"].tolist() if "failed" in cols else [0] * len(cols["step"])
    for i, (step, ts_ns, step_us) in enumerate(
        zip(cols["step"].tolist(), cols["ts_ns"].tolist(), cols["step_us"].tolist(), strict=True)
    ):
        if step_us <= 0 or ts_ns <= 0:
            continue  # not measured
        end = ts_ns / 1000.0
        start = end - step_us
        events.append(
            {
                "name": f"step {step}",
                "cat": "step",
                "ph": "X",
                "pid": rank,
                "tid": 0,
                "ts": round(start, 3),
                "dur": step_us,
                "args": {"step": step, "failed": bool(failed[i])},
            }
        )
        cursor = start
        for phase, values in phase_lists:
            dur = min(values[i], end - cursor)  # phases never run past their step
            if dur <= 0:
                continue
            events.append(
                {"name": phase, "cat": "phase", "ph": "X", "pid": rank, "tid": 0, "ts": round(cursor, 3), "dur": dur}
            )
            cursor += dur
    return events


def _process_counters(rank: int, cols: dict[str, Any]) -> list[dict[str, Any]]:
    events = []
    ts = cols["ts_ns"].tolist()
    cpu = cols["cpu_pct"].tolist() if "cpu_pct" in cols else [math.nan] * len(ts)
    rss = cols["rss_bytes"].tolist() if "rss_bytes" in cols else [-1] * len(ts)
    for t, c, r in zip(ts, cpu, rss, strict=True):
        if t <= 0:
            continue
        if not math.isnan(c):
            events.append({"name": "cpu %", "ph": "C", "pid": rank, "tid": 0, "ts": t / 1000.0, "args": {"cpu": c}})
        if r >= 0:
            events.append(
                {"name": "rss MiB", "ph": "C", "pid": rank, "tid": 0, "ts": t / 1000.0, "args": {"rss": r / 2**20}}
            )
    return events
