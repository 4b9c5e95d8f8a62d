"""Aggregator memory under the 16-rank load: resident memory against rows, until the live store is full.

    python benchmarks/bench_aggregator_memory.py                       # 16 ranks x 1000 steps/s x 40 s, 10,000 rows/rank
    python benchmarks/bench_aggregator_memory.py --capacity 200000     # the default capacity: the store never fills here
    python benchmarks/bench_aggregator_memory.py --tracemalloc         # + the Python heap by room, at each sample
    python benchmarks/bench_aggregator_memory.py --snapshot-s 0.5      # + a live view's snapshots (as a UI driver takes them)

The aggregator runs in this process (``traceml.aggregator.service.Aggregator``, the code that
``python -m traceml.aggregator`` runs: server, ingest, live store, spool recording a ``.tml``,
no UI); the ranks are real processes running the rank runtime, the same as
``benchmarks/bench_load.py`` (``tests/scripts/fault_steps.py``: ``trace_step`` in a paced loop,
bursts of 10 steps, the sender's ~0.5 s batches).  ``--capacity`` is the aggregator's
``--capacity`` (rows kept per rank and table): with the default 10,000 the store of every rank
is full after ~10 s of the 1,000 steps/s load, so the table shows both the growth and the plateau.

Printed every ``--every`` seconds: rows received, the step rows the store holds (at most
capacity per rank), the process's RSS and its growth per row since the first rows arrived;
with ``--tracemalloc`` the traced Python heap split by where each block was allocated (the
store's merged chunks count as "live store"; its newest batches are still the payload bytes
that the transport decoded).  Then the end of the run: RSS before ``finalize()`` (final snapshot,
the diagnosis summary, closing the file), the peak during it, and after.  Last, the bytes the
live store holds per step row by rows per batch, with its coalescing of small batches and
without it (the store as it was).  No assertions.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "scripts"))
import msgpack
from fault_harness import FAULT_STEPS, clean_env

from traceml.aggregator.service import Aggregator, AggregatorOptions
from traceml.schema import STEP_TIME
from traceml.store import ColumnStore
from traceml.store import columns as store_columns
from traceml.transport import encode_columns
from traceml.transport.codec import decode_columns

TOKEN = "memory-token"
RUN_ID = "memory-run"
#: where a traced block was allocated -> the room it is counted in (first match, innermost frame first)
ROOMS = (
    ("traceml/transport", "transport decode (payloads the store keeps)"),
    ("traceml/store", "live store (chunks, arrays)"),
    ("traceml/format", "spool / .tml writer"),
    ("traceml/aggregator", "aggregator (ingest, spool queue)"),
    ("traceml/", "other traceml"),
)


def room_of(tb: tracemalloc.Traceback) -> str:
    for frame in reversed(tb):  # a Traceback lists the oldest frame first: look from the allocation outwards
        for prefix, room in ROOMS:
            if prefix in frame.filename:
                return room
    return "other (imports, threads, numpy, msgpack internals)"


def heap_by_room() -> Counter[str]:
    snap = tracemalloc.take_snapshot()
    out: Counter[str] = Counter()
    for stat in snap.statistics("traceback"):
        out[room_of(stat.traceback)] += stat.size
    return out


class PeakSampler:
    """RSS of this process every ``period_s`` in a thread: the peak between ``reset`` and ``peak``."""

    def __init__(self, period_s: float = 0.02) -> None:
        self.proc = psutil.Process()
        self.period_s = period_s
        self.max = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-peak", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.max = max(self.max, self.proc.memory_info().rss)

    def __enter__(self) -> PeakSampler:
        self.max = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def store_bytes_per_row(batch_rows: int, total_rows: int, coalesce: bool) -> float:
    """Traced bytes a ColumnStore holds per step row fed in wire-decoded batches of ``batch_rows``."""
    saved = store_columns.COALESCE_BATCHES, store_columns.COALESCE_ROWS
    if not coalesce:  # the store as it was: every batch kept as it arrived until a snapshot
        store_columns.COALESCE_BATCHES = store_columns.COALESCE_ROWS = 1 << 62
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        store = ColumnStore(capacity=None)
        before = tracemalloc.get_traced_memory()[0]
        for b in range(total_rows // batch_rows):
            first = b * batch_rows
            cols = {c.name: list(range(first, first + batch_rows)) for c in STEP_TIME.columns}
            cols["failed"] = [0] * batch_rows
            wire = msgpack.unpackb(msgpack.packb(encode_columns(STEP_TIME, cols)))
            store.append(0, "step_time", decode_columns(wire, "step_time")[1], STEP_TIME)
        return (tracemalloc.get_traced_memory()[0] - before) / (total_rows // batch_rows * batch_rows)
    finally:
        if not was_tracing:
            tracemalloc.stop()
        store_columns.COALESCE_BATCHES, store_columns.COALESCE_ROWS = saved


def batch_size_table() -> None:
    data = sum(8 if c.dtype == "i8" else 1 for c in STEP_TIME.columns)
    print(f"live store, bytes held per step row ({data} B of data) by rows per batch, traced heap (tracemalloc):")
    print(f"{'rows/batch':>10} {'as received':>12} {'coalesced':>10}")
    for n in (1, 2, 10, 100, 500):
        total = 20_000 if n > 1 else 6_000
        print(
            f"{n:10} {store_bytes_per_row(n, total, False):12.0f} {store_bytes_per_row(n, total, True):10.0f}",
            flush=True,
        )
    print(
        "(the sender ships every ~0.5 s: one row per batch for the 1 Hz samples, and for step_time when a step takes\n"
        " longer than that; 'as received' is the store before the fix, which kept each batch until a snapshot)\n"
    )


def rank_env(port: int, rank: int, ranks: int) -> dict[str, str]:
    env = clean_env(TRACEML_TOKEN=TOKEN)
    env.update(
        TRACEML_AGGREGATOR_HOST="127.0.0.1",
        TRACEML_AGGREGATOR_PORT=str(port),
        TRACEML_RUN_ID=RUN_ID,
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(ranks),
        LOCAL_WORLD_SIZE=str(ranks),
        GROUP_RANK="0",
    )
    return env


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=16)
    p.add_argument("--rate", type=float, default=1000.0, help="steps per second per rank")
    p.add_argument("--seconds", type=float, default=40.0)
    p.add_argument("--capacity", type=int, default=10_000, help="rows kept per rank and table (aggregator --capacity)")
    p.add_argument("--every", type=float, default=2.0, help="seconds between table rows")
    p.add_argument("--tracemalloc", action="store_true", help="also split the traced Python heap by room")
    p.add_argument("--snapshot-s", type=float, default=0.0, help="take store snapshots this often, as a live view does")
    p.add_argument("--no-batch-table", action="store_true", help="skip the bytes-per-row table by batch size")
    args = p.parse_args()

    if args.tracemalloc:
        tracemalloc.start(16)
    me = psutil.Process()
    with tempfile.TemporaryDirectory(prefix="bench-agg-memory-") as tmp:
        out = Path(tmp) / "run.tml"
        agg = Aggregator(
            AggregatorOptions(
                token=TOKEN,
                run_id=RUN_ID,
                run_name="memory",
                out=str(out),
                expected_ranks=args.ranks,
                capacity=args.capacity,
            )
        )
        agg.start()
        time.sleep(1.0)  # the aggregator's warm-up imports (summary, terminal) land before the baseline
        rss0 = me.memory_info().rss
        steps = int(args.rate * args.seconds)
        cmd = [sys.executable, FAULT_STEPS, "--steps", str(steps), "--rate", str(args.rate), "--burst", "10"]
        procs = [
            subprocess.Popen(
                cmd, env=rank_env(agg.server.port, r, args.ranks), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            for r in range(args.ranks)
        ]
        stop_snap = threading.Event()
        if args.snapshot_s > 0:

            def snapshots() -> None:
                while not stop_snap.wait(args.snapshot_s):
                    agg.store.snapshot()

            threading.Thread(target=snapshots, name="ui-snapshots", daemon=True).start()
        print(
            f"{args.ranks} ranks x {args.rate:.0f} steps/s x {args.seconds:.0f} s into an in-process aggregator; "
            f"capacity {args.capacity:,} rows per rank and table"
            f"{f'; store snapshots every {args.snapshot_s} s' if args.snapshot_s > 0 else ''}; "
            f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
        )
        head = f"{'s':>5} {'rows received':>14} {'step rows held':>15} {'RSS MiB':>8} {'+RSS MiB':>9} {'B/row recvd':>12} {'B/row held':>11}"
        if args.tracemalloc:
            head += "  traced heap MiB by room"
        print(head)
        print("-" * len(head))
        t0 = time.monotonic()
        first: tuple[float, int, int] | None = None  # (t, rows, rss) when the first rows arrived
        next_t = t0
        while any(proc.poll() is None for proc in procs):
            time.sleep(0.05)
            now = time.monotonic()
            stats = agg.ingest.stats
            if first is None and stats.rows:
                first = (now, stats.rows, me.memory_info().rss)
            if now < next_t or first is None:
                continue
            next_t = now + args.every
            rows = stats.rows
            # step rows dominate every rank's batches (the samplers add ~2 rows/s): held = min(rows, capacity) per rank
            held = sum(min(n, args.capacity) for n in stats.rows_by_rank.values())
            rss = me.memory_info().rss
            grow = rss - first[2]
            line = (
                f"{now - t0:5.1f} {rows:14,} {held:15,} {rss / 2**20:8.1f} {grow / 2**20:9.1f} "
                f"{grow / max(rows - first[1], 1):12.1f} {grow / max(held, 1):11.1f}"
            )
            if args.tracemalloc:
                by = heap_by_room()
                line += "  " + ", ".join(f"{k.split(' (')[0]} {v / 2**20:.1f}" for k, v in by.most_common())
            print(line, flush=True)
        stop_snap.set()
        agg.on_exit({"exit_code": 0, "signal": "", "duration_s": time.monotonic() - t0})
        agg.wait()
        rss_before = me.memory_info().rss
        with PeakSampler() as peak:
            t_fin = time.monotonic()
            view = agg.finalize()
            fin_s = time.monotonic() - t_fin
        agg.close_ui(None)
        rss_after = me.memory_info().rss
        received = agg.ingest.stats.rows
        held = view.total_rows()
        print(
            f"\nend of run: {received:,} rows received, {held:,} held (all tables); RSS {rss0 / 2**20:.1f} MiB before the"
            f" ranks connected, {rss_before / 2**20:.1f} MiB when they had finished"
        )
        print(
            f"finalize() (final snapshot, summary, closing the file, {fin_s:.1f} s): peak RSS {peak.max / 2**20:.1f} MiB"
            f" (+{(peak.max - rss_before) / 2**20:.1f} MiB, {(peak.max - rss_before) / max(held, 1):.0f} B per held row),"
            f" {rss_after / 2**20:.1f} MiB after"
        )
        print(
            f"bench_load's figure, (peak - RSS at start) / rows received: {(peak.max - rss0) / max(received, 1):.0f} B per row;"
            f" the live growth: {(rss_before - rss0) / max(held, 1):.0f} B per held row"
        )
        for proc in procs:
            proc.wait()
    if not args.no_batch_table:
        print()
        batch_size_table()


if __name__ == "__main__":
    main()
