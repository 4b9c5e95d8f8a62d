"""Aggregator throughput: simulated ranks (subprocesses) stream realistic column batches over
loopback to the real aggregator (TelemetryServer -> Ingest -> ColumnStore + Spool -> TmlWriter).

    python benchmarks/bench_aggregator.py                      # 8 ranks, 10 M rows
    python benchmarks/bench_aggregator.py --ranks 4 --rows 2000000

The aggregator runs in this process (the same code ``python -m traceml.aggregator`` runs), so
its CPU time and peak RSS are this process's; the senders replay pre-encoded frames, so their
cost is the kernel's.  Prints one table: rows decoded + stored, rows spooled to disk, rows per
second of wall time and per CPU-second of the aggregator (the ">= 1 M rows/s per core" target) overall and for each of its two busy threads,
and the RSS after each tenth of the rows (flat: the live store is bounded).
"""

from __future__ import annotations

import argparse
import os
import resource
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from traceml.aggregator.service import Aggregator, AggregatorOptions
from traceml.schema import PHASES, PROCESS, STEP_MEMORY, STEP_REGION, STEP_TIME, SYSTEM
from traceml.transport import RankIdentity, batch, encode_columns, encode_frame, hello, rank_finished

RUN_ID = "bench-aggregator"
REGIONS = ("data/augment", "loss/compute")


def make_batches(rank: int, steps_per_batch: int, distinct: int, seed: int) -> list[bytes]:
    """``distinct`` batch frames of a rank: step_time, step_memory, step_region (str names),
    process and system rows with realistic magnitudes and noise."""
    rng = np.random.default_rng(seed + rank)
    frames = []
    for b in range(distinct):
        first = b * steps_per_batch
        steps = np.arange(first, first + steps_per_batch, dtype=np.int64)
        ts = 1_700_000_000_000_000_000 + steps * 8_000_000 + rng.integers(0, 50_000, steps_per_batch)
        phase = {p: rng.gamma(4.0, 250.0, steps_per_batch).astype(np.int64) for p in PHASES}
        step_cols = {
            "step": steps,
            "ts_ns": ts,
            "failed": np.zeros(steps_per_batch, np.uint8),
            "step_us": sum(phase.values()),
            **{f"{p}_us": v for p, v in phase.items()},
        }
        mem_cols = {
            "step": steps,
            "ts_ns": ts,
            "peak_alloc_bytes": (3 << 30) + rng.integers(0, 1 << 24, steps_per_batch),
            "peak_reserved_bytes": np.full(steps_per_batch, 4 << 30, np.int64),
        }
        half = steps_per_batch // 2
        region_cols = {
            "step": steps[:half],
            "ts_ns": ts[:half],
            "name": [REGIONS[i % 2] for i in range(half)],
            "cpu_us": rng.gamma(2.0, 100.0, half).astype(np.int64),
            "calls": np.ones(half, np.int32),
        }
        t = ts[-1]
        proc_cols = {
            "ts_ns": [t],
            "cpu_pct": [97.5],
            "rss_bytes": [2 << 30],
            "threads": [24],
            "fds": [80],
            "gpu_alloc_bytes": [3 << 30],
            "gpu_reserved_bytes": [4 << 30],
            "gpu_total_bytes": [80 << 30],
        }
        sys_cols = {
            "ts_ns": [t],
            "node_rank": [0],
            "cpu_pct": [55.0],
            "ram_used_bytes": [64 << 30],
            "ram_total_bytes": [512 << 30],
        }
        tables = {
            "step_time": encode_columns(STEP_TIME, step_cols),
            "step_memory": encode_columns(STEP_MEMORY, mem_cols),
            "step_region": encode_columns(STEP_REGION, region_cols),
            "process": encode_columns(PROCESS, proc_cols),
            "system": encode_columns(SYSTEM, sys_cols),
        }
        frames.append(encode_frame(batch(b + 1, tables)))
    return frames


def rows_per_batch(steps_per_batch: int) -> int:
    return 2 * steps_per_batch + steps_per_batch // 2 + 2


def sender(args: argparse.Namespace) -> None:
    """One simulated rank: hello, then ``--batches`` frames as fast as the socket takes them."""
    ident = RankIdentity(
        rank=args.rank,
        local_rank=args.rank,
        world_size=args.ranks,
        local_world_size=args.ranks,
        host="bench",
        pid=os.getpid(),
    )
    frames = make_batches(args.rank, args.steps_per_batch, args.distinct, args.seed)
    with socket.create_connection(("127.0.0.1", args.port)) as s:
        s.sendall(encode_frame(hello(RUN_ID, os.environ["TRACEML_TOKEN"], ident)))
        for i in range(args.batches):
            s.sendall(frames[i % len(frames)])
        s.sendall(encode_frame(rank_finished("ok")))


def run(args: argparse.Namespace) -> None:
    per_batch = rows_per_batch(args.steps_per_batch)
    batches = max(1, args.rows // (per_batch * args.ranks))
    total_rows = batches * per_batch * args.ranks
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="bench-agg-") as tmp:
        out = Path(tmp) / "run.tml"
        agg = Aggregator(
            AggregatorOptions(
                token=token,
                run_id=RUN_ID,
                run_name="bench",
                out=str(out),
                expected_ranks=args.ranks,
                capacity=args.capacity,
            )
        )
        me = psutil.Process()
        rss_start = me.memory_info().rss
        agg.start()
        env = {**os.environ, "TRACEML_TOKEN": token}
        cmd = [sys.executable, __file__, "--sender", "--port", str(agg.server.port), "--ranks", str(args.ranks)]
        cmd += [
            "--batches",
            str(batches),
            "--steps-per-batch",
            str(args.steps_per_batch),
            "--distinct",
            str(args.distinct),
        ]
        procs = [subprocess.Popen([*cmd, "--rank", str(r)], env=env) for r in range(args.ranks)]
        # the clock starts with the first rows (the senders' start-up is not the aggregator's time)
        while agg.ingest.stats.rows == 0 and not all(p.poll() is not None for p in procs):
            time.sleep(0.001)
        cpu0, t0 = time.process_time(), time.perf_counter()
        rss_marks: list[tuple[int, int]] = []
        next_mark = total_rows // 10
        while agg.ingest.stats.rows < total_rows:
            if agg.ingest.stats.rows >= next_mark:
                rss_marks.append((agg.ingest.stats.rows, me.memory_info().rss))
                next_mark += total_rows // 10
            if all(p.poll() is not None for p in procs) and agg.ingest.open_connections == 0:
                break
            time.sleep(0.005)
        t_ingest = time.perf_counter() - t0
        rss_marks.append((agg.ingest.stats.rows, me.memory_info().rss))
        assert agg.spool is not None
        while agg.spool.rows_written < agg.ingest.stats.rows and not agg.spool.error:
            time.sleep(0.005)
        t_spool, cpu_spool = time.perf_counter() - t0, time.process_time() - cpu0
        thread_cpu = {t.id: t.user_time + t.system_time for t in me.threads()}
        io_cpu = thread_cpu.get(agg.server._thread.native_id, float("nan"))  # type: ignore[union-attr]
        spool_cpu = thread_cpu.get(agg.spool._thread.native_id, float("nan"))
        for p in procs:
            p.wait()
        agg.on_exit({"exit_code": 0, "signal": "", "duration_s": t_spool})
        agg.wait()
        t_fin = time.perf_counter()
        view = agg.finalize()
        finalize_s = time.perf_counter() - t_fin
        agg.close_ui(None)  # no summary screen in a benchmark
        size = out.stat().st_size
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    received = agg.ingest.stats.rows
    print()
    print(
        f"aggregator benchmark: {args.ranks} ranks, {per_batch} rows/batch, {received:,} rows (expected {total_rows:,})"
    )
    print(f"{'measure':<44}{'value':>18}")
    print("-" * 62)
    rows = [
        ("rows decoded + stored (live store)", f"{received:,}"),
        ("rows spooled to the .tml", f"{agg.spool.rows_written:,}"),
        ("wall s, first rows -> all stored", f"{t_ingest:.2f}"),
        ("wall s, first rows -> all spooled", f"{t_spool:.2f}"),
        ("rows/s stored + spooled (wall)", f"{received / t_spool:,.0f}"),
        ("aggregator CPU s (all its threads)", f"{cpu_spool:.2f}"),
        ("rows/s per aggregator CPU-second", f"{received / cpu_spool:,.0f}"),
        ("I/O thread CPU s (frames, decode, store)", f"{io_cpu:.2f}"),
        ("  rows/s per CPU-second of that thread", f"{received / io_cpu:,.0f}"),
        ("spool thread CPU s (compress, write)", f"{spool_cpu:.2f}"),
        ("  rows/s per CPU-second of that thread", f"{received / spool_cpu:,.0f}"),
        ("recording bytes / row", f"{size / max(received, 1):.2f}"),
        ("finalize s (summary + close)", f"{finalize_s:.2f}"),
        ("RSS before start MiB", f"{rss_start / 2**20:.0f}"),
        ("peak RSS MiB", f"{peak_rss / 2**20:.0f}"),
    ]
    for name, value in rows:
        print(f"{name:<44}{value:>18}")
    print("RSS (MiB) as rows arrive: " + ", ".join(f"{n / 1e6:.1f}M={r / 2**20:.0f}" for n, r in rss_marks))
    print(f"live rows held: {view.total_rows():,} (capacity {args.capacity:,} per rank and table)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--rows", type=int, default=10_000_000, help="total rows over all ranks")
    p.add_argument("--steps-per-batch", type=int, default=1000)
    p.add_argument("--distinct", type=int, default=16, help="distinct pre-encoded batches per rank")
    p.add_argument("--capacity", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sender", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--batches", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    sender(args) if args.sender else run(args)


if __name__ == "__main__":
    main()
