"""Load: 16 synthetic ranks x 1,000 steps/s x 60 s over loopback into one aggregator process.

    python benchmarks/bench_load.py                          # 16 x 1000 steps/s x 60 s
    python benchmarks/bench_load.py --seconds 10 --ranks 8   # shorter
    python benchmarks/bench_load.py --small-capacity-ranks 2 # 2 ranks keep 64 rows/table: they drop, counted

Each rank is a real process running the rank runtime (``tests/scripts/fault_steps.py``:
``traceml.trace_step`` in a paced loop, bursts of 10 steps, no torch) streaming to a real
``python -m traceml.aggregator`` that records a ``.tml`` (the driver is
``tests/scripts/fault_load.py``, shared with ``tests/test_scale_load.py``).  Printed: per rank,
the steps run, the rate reached, rows recorded and rows it reported dropped (recorded + dropped
must equal steps: nothing lost uncounted); the aggregator's resident memory and CPU time; the
file's size per row.  No assertions: the last line says whether the accounting held.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "scripts"))
from fault_load import run_load

from traceml.format import open_recording


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=16)
    p.add_argument("--rate", type=float, default=1000.0, help="steps per second per rank")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--small-capacity-ranks", type=int, default=0)
    p.add_argument("--keep", type=Path, default=None, help="keep the run's directory here")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_load-") as tmp:
        work = args.keep or Path(tmp)
        res = run_load(
            work, ranks=args.ranks, rate=args.rate, seconds=args.seconds, small_capacity_ranks=args.small_capacity_ranks
        )
        rec = open_recording(res.out)
        recorded = {rank: len(cols["step"]) for rank, cols in rec.read_table("step_time").items()}
        infos = {r["rank"]: r for r in rec.attachments["ranks"]["ranks"]}
        file_bytes = res.out.stat().st_size
        rows_all = sum(n for seg in rec.segments for n in seg.rows.values())

        print(
            f"{args.ranks} ranks x {args.rate:.0f} steps/s x {args.seconds:.0f} s over loopback; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n"
        )
        head = f"{'rank':>4} {'steps':>8} {'seconds':>8} {'steps/s':>9} {'recorded':>9} {'dropped':>8} {'state':>9} {'accounted':>10}"
        print(head)
        print("-" * len(head))
        ok = True
        for rank in range(args.ranks):
            steps = res.steps.get(rank, 0)
            secs = res.rank_seconds.get(rank, float("nan"))
            info = infos.get(rank, {})
            dropped = int(info.get("drops", {}).get("step_time", 0))
            got = recorded.get(rank, 0)
            accounted = got + dropped == steps
            ok &= accounted and res.rank_codes.get(rank) == 0
            print(
                f"{rank:4} {steps:8,} {secs:8.2f} {steps / secs:9.0f} {got:9,} {dropped:8,} {info.get('state', '?'):>9} {'yes' if accounted else 'NO':>10}"
            )
        total_steps = res.total_steps
        total_recorded = sum(recorded.values())
        rate = total_steps / max(res.rank_seconds.values())
        print(
            f"\nall ranks: {total_steps:,} steps, {total_recorded:,} step rows recorded ({total_steps - total_recorded:,} dropped, all counted: {ok})"
        )
        print(f"offered load reached: {rate:,.0f} steps/s over all ranks (target {args.ranks * args.rate:,.0f})")
        print(
            f"aggregator: RSS {res.rss_start / 2**20:.0f} MiB at start, {res.rss_max / 2**20:.0f} MiB max; "
            f"{res.aggregator_cpu_s:.1f} CPU-s over {res.wall_s:.1f} s ({100 * res.aggregator_cpu_s / res.wall_s:.0f}% of a core); exit {res.aggregator_code}"
        )
        print(
            f"recording: {file_bytes / 2**20:.2f} MiB, {rows_all:,} rows of every table, {file_bytes / rows_all:.2f} B/row, {file_bytes / max(total_recorded, 1):.2f} B per rank-step; integrity {rec.integrity['status']}"
        )
        print(f"\nnothing lost uncounted: {'YES' if ok else 'NO'}")


if __name__ == "__main__":
    main()
