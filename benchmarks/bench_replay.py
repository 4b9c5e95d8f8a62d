"""Benchmark replay: rows/s to open a recording and read every column (no assertions).

    .venv/bin/python benchmarks/bench_replay.py [--ranks 8] [--steps 1000000] [--rounds 3] [--file run.tml]

The recording is bench_dashboard.py's: written like the aggregator writes one (TmlWriter defaults:
1 MiB segments, ranks interleaved in 10 000-step batches) from a synthetic run with every
standard table of a GPU run, process/system samples every 100 steps.  ``--file`` keeps it (and reuses it when it exists).
Measured per round, median shown:

* ``reader.read_table`` x tables: the format's reader, one table after another (the baseline);
* ``replay.open().view()`` with 1 worker and with the default workers: open + decode + the
  unbounded ColumnStore + rank table, attachments, integrity (what ``traceml replay`` loads);
* ``load(["step_time"])``: what the dashboard's first charts need;
* ``columns(step_time, rank, steps=1000 steps)``: a seek through the index, against reading the
  whole table and slicing it;
* ``Playback.finish()``: ``traceml replay --speed max`` on a loaded recording.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import replay
from replay.engine import _default_workers
from replay.player import Playback
from traceml.format import open_recording

try:  # the same recording as bench_dashboard.py (run from the benchmarks directory or the repo root)
    from bench_dashboard import make_recording
except ImportError:  # pragma: no cover
    from benchmarks.bench_dashboard import make_recording


def timed(fn: Callable[[], Any], rounds: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(rounds):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--file", type=Path, default=None, help="keep the recording here (reused if it exists)")
    args = ap.parse_args()

    tmp = None
    path = args.file
    if path is None:
        tmp = tempfile.TemporaryDirectory()
        path = Path(tmp.name) / "bench.tml"
    if not path.exists():
        make_recording(path, args.ranks, args.steps)
    try:
        with open_recording(path) as reader:
            rows = sum(n for seg in reader.segments for n in seg.rows.values())
            step_rows = sum(n for seg in reader.segments for (_, t), n in seg.rows.items() if t == "step_time")
            tables = reader.tables
            segments = len(reader.segments)
        print(
            f"{path.name}: {path.stat().st_size / 1e6:.1f} MB, {segments} segments, {rows:,} rows ({step_rows:,} step_time)"
        )
        print(
            f"cpus: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}, default workers: {_default_workers()}\n"
        )

        def baseline() -> int:
            with open_recording(path) as r:
                return sum(sum(len(next(iter(c.values()))) for c in r.read_table(t).values()) for t in tables)

        def view(workers: int) -> Callable[[], int]:
            def run() -> int:
                with replay.open(path, workers=workers, progress=False) as rec:
                    return rec.view().total_rows()

            return run

        def first_charts() -> int:
            with replay.open(path, progress=False) as rec:
                return sum(len(c["step"]) for c in rec.load(["step_time"])["step_time"].values())

        mid = args.steps // 2

        def seek() -> int:
            with replay.open(path, progress=False) as rec:
                return len(rec.columns("step_time", 0, steps=(mid, mid + 999))["step"])

        def full_then_slice() -> int:
            with open_recording(path) as r:
                cols = r.read_table("step_time", ranks=[0])[0]
                keep = (cols["step"] >= mid) & (cols["step"] <= mid + 999)
                return int(keep.sum())

        results = []
        base_s, n = timed(baseline, args.rounds)
        results.append(("reader.read_table, every table (baseline)", base_s, n))
        for label, fn in (
            ("replay.open().view(), 1 worker", view(1)),
            (f"replay.open().view(), {_default_workers()} workers", view(_default_workers())),
            ("load step_time only (first charts)", first_charts),
        ):
            s, n = timed(fn, args.rounds)
            results.append((label, s, n))
        seek_s, seek_n = timed(seek, args.rounds)
        slice_s, slice_n = timed(full_then_slice, args.rounds)

        with replay.open(path, progress=False) as rec:
            rec.load()
            play_s, end = timed(lambda: Playback(rec).finish(), 1)
            play_rows = end.total_rows()

        print(f"{'what':48} {'seconds':>8} {'rows':>12} {'rows/s':>12} {'vs baseline':>12}")
        for label, s, n in results:
            print(f"{label:48} {s:8.3f} {n:12,} {n / s:12,.0f} {base_s / s:11.2f}x")
        print(
            f"{'columns(step_time, 0, 1000 steps): index seek':48} {seek_s:8.3f} {seek_n:12,} {seek_n / seek_s:12,.0f} {slice_s / seek_s:11.1f}x"
        )
        print(
            f"{'  read rank 0 step_time whole + slice':48} {slice_s:8.3f} {slice_n:12,} {slice_n / slice_s:12,.0f} {'1.00x':>12}"
        )
        print(
            f"{'Playback.finish() (--speed max), loaded':48} {play_s:8.3f} {play_rows:12,} {play_rows / play_s:12,.0f}"
        )
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
