"""Benchmark the .tml format on step-timing rows against a naive baseline (no assertions).

    .venv/bin/python benchmarks/bench_format.py [--rows 400000] [--ranks 8] [--rounds 3]

Rows are ``step_time`` rows (step, ts_ns, failed, step_us and six phase durations in µs)
with realistic jitter: Gaussian noise of a few percent per phase, rare dataloader stalls,
nanosecond noise on the timestamps.  For each round, .tml and the baseline (one msgpack
dict per row, zstd level 3 over ~1 MiB chunks) run back to back on the same rows; the
table shows the median over rounds.
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

import msgpack
import numpy as np
import zstandard

from traceml.format import TmlWriter, open_recording
from traceml.schema import PHASES, STEP_TIME

PHASE_MEAN_US = {"dataloader": 400, "h2d": 900, "forward": 31_000, "backward": 62_000, "optimizer": 5_200}
PHASE_JITTER = {"dataloader": 0.25, "h2d": 0.05, "forward": 0.02, "backward": 0.02, "optimizer": 0.03}


def step_rows(steps: int, rank: int, seed: int) -> dict[str, np.ndarray]:
    """``steps`` rows of one rank, as columns."""
    rng = np.random.default_rng(seed * 1000 + rank)
    cols: dict[str, np.ndarray] = {}
    skew = 1.0 + 0.01 * rank
    for phase, mean in PHASE_MEAN_US.items():
        values = rng.normal(mean * skew, mean * PHASE_JITTER[phase], steps)
        cols[f"{phase}_us"] = np.maximum(values, 1).astype(np.int64)
    stalls = rng.random(steps) < 0.01
    cols["dataloader_us"][stalls] *= 20
    cols["residual_us"] = np.abs(rng.normal(150, 60, steps)).astype(np.int64)
    cols["step_us"] = sum(cols[f"{p}_us"] for p in PHASES)
    start_ns = 1_760_000_000_000_000_000 + rank * 1_234_567
    cols["ts_ns"] = start_ns + np.cumsum(cols["step_us"] * 1000 + rng.integers(0, 1000, steps))
    cols["step"] = np.arange(steps, dtype=np.int64)
    cols["failed"] = (rng.random(steps) < 0.0005).astype(np.uint8)
    return {c.name: cols[c.name] for c in STEP_TIME.columns}


def batches(per_rank: dict[int, dict[str, np.ndarray]], batch: int) -> list[tuple[int, dict[str, np.ndarray]]]:
    """Interleave ranks the way an aggregator receives them: one batch per rank in turn."""
    out = []
    steps = len(next(iter(per_rank.values()))["step"])
    for start in range(0, steps, batch):
        for rank, cols in per_rank.items():
            out.append((rank, {k: v[start : start + batch] for k, v in cols.items()}))
    return out


def tml_write(path: Path, work: list[tuple[int, dict[str, np.ndarray]]], rollups: bool = True) -> None:
    options = {} if rollups else {"rollup_steps": None}
    with TmlWriter(path, run_meta={"run_id": "bench"}, **options) as writer:
        for rank, cols in work:
            writer.append(rank, "step_time", cols)


def tml_read(path: Path) -> int:
    with open_recording(path) as reader:
        data = reader.read_table("step_time")
    return sum(len(cols["step"]) for cols in data.values())


def naive_write(path: Path, work: list[tuple[int, dict[str, np.ndarray]]]) -> None:
    compressor = zstandard.ZstdCompressor(level=3)
    names = list(STEP_TIME.names)
    with open(path, "wb") as f:
        chunk: list[bytes] = []
        size = 0
        for rank, cols in work:
            lists = [cols[n].tolist() for n in names]
            for values in zip(*lists, strict=True):
                row = {"rank": rank, **dict(zip(names, values, strict=True))}
                packed = msgpack.packb(row)
                chunk.append(packed)
                size += len(packed)
                if size >= 1 << 20:
                    blob = compressor.compress(b"".join(chunk))
                    f.write(len(blob).to_bytes(4, "little") + blob)
                    chunk, size = [], 0
        if chunk:
            blob = compressor.compress(b"".join(chunk))
            f.write(len(blob).to_bytes(4, "little") + blob)
        f.flush()
        os.fdatasync(f.fileno())


def naive_read(path: Path) -> int:
    decompressor = zstandard.ZstdDecompressor()
    columns: dict[tuple[int, str], list[Any]] = {}
    data = path.read_bytes()
    pos = 0
    rows = 0
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 4], "little")
        raw = decompressor.decompress(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
        for row in _unpack_all(raw):
            rank = row.pop("rank")
            for name, value in row.items():
                columns.setdefault((rank, name), []).append(value)
            rows += 1
    arrays = {key: np.asarray(values) for key, values in columns.items()}
    return rows if arrays else 0


def _unpack_all(raw: bytes) -> msgpack.Unpacker:
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(raw)
    return unpacker


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


class SteppedClock:
    """A clock the live-shaped run advances by one second per simulated second."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def live_shaped(path: Path, ranks: int, steps_per_s: int, seconds: int) -> float:
    """Bytes per step row of a recording written the way the aggregator writes it: every rank's
    rows of each second arrive together and the 1 s time bound closes a segment per second."""
    per_rank = {rank: step_rows(steps_per_s * seconds, rank, seed=2) for rank in range(ranks)}
    clock = SteppedClock()
    with TmlWriter(path, run_meta={"run_id": "live"}, clock=clock, fsync_interval_s=None) as writer:
        for second in range(seconds):
            lo, hi = second * steps_per_s, (second + 1) * steps_per_s
            for rank, cols in per_rank.items():
                writer.append(rank, "step_time", {k: v[lo:hi] for k, v in cols.items()})
            clock.now += 1.0
            writer.tick()
    return path.stat().st_size / (ranks * steps_per_s * seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400_000, help="total step rows (split over ranks)")
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 256, 4096], help="rows per append")
    parser.add_argument("--baseline-rows", type=int, default=100_000, help="rows for the (slow) baseline")
    args = parser.parse_args()

    steps = args.rows // args.ranks
    per_rank = {rank: step_rows(steps, rank, seed=1) for rank in range(args.ranks)}
    total = steps * args.ranks
    base_steps = max(1, args.baseline_rows // args.ranks)
    base_rank = {rank: {k: v[:base_steps] for k, v in cols.items()} for rank, cols in per_rank.items()}
    base_total = base_steps * args.ranks
    raw_row_bytes = sum(np.dtype(v.dtype).itemsize for v in per_rank[0].values())

    results: dict[str, dict[str, list[float]]] = {}

    def record(name: str, rows: int, write: tuple[float, float], read: tuple[float, float], size: int) -> None:
        entry = results.setdefault(name, {"w": [], "wc": [], "r": [], "rc": [], "b": []})
        entry["w"].append(rows / write[0])
        entry["wc"].append(rows / write[1])
        entry["r"].append(rows / read[0])
        entry["rc"].append(rows / read[1])
        entry["b"].append(size / rows)

    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for batch in args.batch:
                work = batches(per_rank, batch)
                path = Path(tmp) / f"run_{batch}.tml"
                write = timed(lambda w=work, p=path: tml_write(p, w))
                read = timed(lambda p=path: tml_read(p))
                record(f".tml, {batch} rows/append", total, write, read, path.stat().st_size)
                assert tml_read(path) == total
                bare = Path(tmp) / f"bare_{batch}.tml"  # the same without the rollup (format 1.0's cost)
                write = timed(lambda w=work, p=bare: tml_write(p, w, rollups=False))
                read = timed(lambda p=bare: tml_read(p))
                record(f".tml, {batch} rows/append, no rollup", total, write, read, bare.stat().st_size)
            work = batches(base_rank, 256)
            path = Path(tmp) / "naive.bin"
            write = timed(lambda w=work, p=path: naive_write(p, w))
            read = timed(lambda p=path: naive_read(p))
            record("baseline: msgpack dict/row + zstd", base_total, write, read, path.stat().st_size)
        live = [
            (ranks, sps, live_shaped(Path(tmp) / "live.tml", ranks, sps, 300))
            for ranks, sps in ((1, 10), (8, 10), (64, 2), (256, 2))
        ]

    print(f"step_time rows: {total:,} over {args.ranks} ranks ({raw_row_bytes} B/row as raw columns);")
    print(f"baseline on {base_total:,} rows; median of {args.rounds} interleaved rounds;")
    print("rates per wall-clock second and per CPU-second of this process (the machine is shared)\n")
    header = (
        f"{'writer':36} {'write rows/s':>13} {'(CPU)':>11} {'read+decode rows/s':>19} {'(CPU)':>11}"
        f" {'B/row on disk':>14} {'ratio':>7}"
    )
    print(header)
    print("-" * len(header))
    for name, entry in results.items():
        w, wc, r, rc, b = (statistics.median(entry[k]) for k in ("w", "wc", "r", "rc", "b"))
        print(f"{name:36} {w:>13,.0f} {wc:>11,.0f} {r:>19,.0f} {rc:>11,.0f} {b:>14.2f} {raw_row_bytes / b:>6.1f}x")
    print("\nratio = raw column bytes per row / bytes per row on disk; targets: write >= 1 M rows/s,")
    print("read+decode >= 5 M rows/s, <= 16 B per step row.\n")
    print("live-shaped recordings (one 1 s segment per second, 300 s, step_time only):")
    print(f"{'ranks':>6} {'steps/s/rank':>13} {'rows/segment':>13} {'B/row on disk':>14}")
    for ranks, sps, per_row in live:
        print(f"{ranks:>6} {sps:>13} {ranks * sps:>13} {per_row:>14.2f}")


if __name__ == "__main__":
    main()
