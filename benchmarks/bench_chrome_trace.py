"""Size and speed of ``traceml export --format chrome-trace`` (no assertions).

    python benchmarks/bench_chrome_trace.py                 # 4 ranks x 20,000 steps
    python benchmarks/bench_chrome_trace.py --steps 50000

Writes a recording of realistic tables with the real writer -- per rank and step a step_time
row (noisy phases of a ~6 ms step), its step_timeline row (gaps of a few µs between phases),
one ``trace_time`` region; a process sample per second of run time -- then exports it as a
gzipped trace, as plain JSON, and a window (``--steps``), and prints events, bytes, bytes per
event and seconds.  The target is <= 25 B per event on disk (gzipped).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from traceml.format import TmlWriter, open_recording
from traceml.format.export import chrome_trace, write_chrome_trace
from traceml.schema import (
    PHASES,
    PROCESS,
    STANDARD_TABLES,
    STEP_REGION,
    STEP_TIME,
    STEP_TIMELINE,
    TIMELINE_PHASES,
    phase_gaps,
    rows_to_columns,
)


def record(path: Path, ranks: int, steps: int) -> None:
    w = TmlWriter(path, run_meta={"run_id": "bench"}, schemas=list(STANDARD_TABLES.values()), fsync_interval_s=None)
    t0 = time.time_ns()
    for rank in range(ranks):
        rng = np.random.default_rng(rank)
        means = {"dataloader": 300, "h2d": 0, "forward": 2000, "backward": 3000, "optimizer": 500, "residual": 200}
        phases = {
            f"{p}_us": np.maximum(rng.normal(m, m / 10 + 1, steps), 0).astype(np.int64)
            if m
            else np.zeros(steps, np.int64)
            for p, m in means.items()
        }
        step_us = sum(phases.values())
        ts = t0 + np.cumsum(step_us * 1000)
        cols = {
            "step": np.arange(steps),
            "ts_ns": ts,
            "failed": np.zeros(steps, np.uint8),
            "step_us": step_us,
            **phases,
        }
        w.append(rank, "step_time", cols)
        gap = rng.integers(2, 12, (steps, 3))
        fwd0 = phases["dataloader_us"] + gap[:, 0]
        bwd0 = fwd0 + phases["forward_us"] + gap[:, 1]
        opt0 = bwd0 + phases["backward_us"] + gap[:, 2]
        durations = [phases[f"{p}_us"] for p in TIMELINE_PHASES]
        starts = [np.zeros(steps, np.int64), np.full(steps, -1, np.int64), fwd0, bwd0, opt0]
        gaps = phase_gaps(durations, starts)
        w.append(
            rank,
            "step_timeline",
            {"step": np.arange(steps), **{f"{p}_gap_us": g for p, g in zip(TIMELINE_PHASES, gaps, strict=True)}},
        )
        regions = [(s, int(ts[s]), "loss", 150, 1, int(fwd0[s]) + 1900) for s in range(steps)]
        w.append(rank, "step_region", rows_to_columns(STEP_REGION, regions))
        seconds = np.arange(ts[0], ts[-1], 1_000_000_000)
        proc = [(int(t), 95.0, 3 << 30, 12, 40, -1, -1, -1) for t in seconds]
        w.append(rank, "process", rows_to_columns(PROCESS, proc))
    w.close()
    assert STEP_TIME.names and STEP_TIMELINE.names and PHASES


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--steps", type=int, default=20_000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rec = Path(tmp) / "run.tml"
        record(rec, args.ranks, args.steps)
        print(f"{args.ranks} ranks x {args.steps:,} steps; recording {rec.stat().st_size / 2**20:.1f} MiB\n")
        print(f"{'export':<28} {'events':>10} {'MiB':>8} {'B/event':>8} {'seconds':>8}")
        with open_recording(rec) as reader:
            n_all = len(chrome_trace(reader)["traceEvents"])
            half = args.steps // 2
            n_win = len(chrome_trace(reader, (half, half + 1000))["traceEvents"])
            for label, gz, window, n in (
                ("gzipped (default)", True, (None, None), n_all),
                ("plain JSON (--no-gzip)", False, (None, None), n_all),
                (f"--steps {half}:{half + 1000}, gzipped", True, (half, half + 1000), n_win),
            ):
                out = Path(tmp) / f"t{int(gz)}{window[0]}.json"
                t = time.perf_counter()
                write_chrome_trace(reader, out, gzip_output=gz, steps=window)
                dt = time.perf_counter() - t
                size = out.stat().st_size
                print(f"{label:<28} {n:>10,} {size / 2**20:>8.2f} {size / n:>8.1f} {dt:>8.2f}")


if __name__ == "__main__":
    main()
