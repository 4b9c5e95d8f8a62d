"""Many ranks into one aggregator: 256 x 10 steps/s and 1,024 x 1 step/s over loopback, then a
sweep to find where one aggregator saturates (no assertions).

    .venv/bin/python benchmarks/bench_many_ranks.py                      # both scenarios, 60 s each, and the sweep
    .venv/bin/python benchmarks/bench_many_ranks.py --seconds 20 --no-sweep

One generator process plays every rank over its own TCP connection with the real wire protocol
(``tests/scripts/swarm_load.py``: a batch of the last 0.5 s of steps and a process sample per
second per rank, heartbeats when idle) into a real ``python -m traceml.aggregator`` recording a
``.tml``.  Per scenario: rows sent and recorded (and so rows lost), the aggregator's CPU per
rank-step and share of one core, its peak RSS, and whether the file is valid.  The sweep raises
the rate of 1,024 ranks until the aggregator's CPU share of one core nears 100 % or the rows stop
keeping up: that is where one aggregator saturates on this machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "scripts"))
from swarm_load import run_swarm

from traceml.format import open_recording


def scenario(tmp: Path, ranks: int, rate: float, seconds: float, nodes: int) -> dict[str, float | str]:
    res = run_swarm(tmp / f"r{ranks}x{rate:g}", ranks=ranks, rate=rate, seconds=seconds, nodes=nodes)
    with open_recording(res.out) as rec:
        status = rec.integrity["status"]
        recorded = sum(len(c["step"]) for c in rec.read_table("step_time").values())
    rank_steps = max(1, res.total_sent)
    return {
        "ranks": ranks,
        "rate": rate,
        "rank_steps_per_s": ranks * rate,
        "sent": res.total_sent,
        "recorded": recorded,
        "lost": res.total_sent - recorded,
        "cpu_us_per_rank_step": 1e6 * res.cpu_during_load_s / rank_steps,
        "cpu_share": res.cpu_during_load_s / seconds,
        "rss_mib": res.rss_max / 2**20,
        "rss_start_mib": res.rss_start / 2**20,
        "stalls": res.send_stalls,
        "lag_ms": 1e3 * res.generator_lag_s,
        "file": status,
        "exit": res.aggregator_code,
    }


def show(rows: list[dict[str, float | str]]) -> None:
    head = (
        f"{'ranks':>6} {'steps/s':>8} {'rank-steps/s':>12} {'sent':>9} {'recorded':>9} {'lost':>5}"
        f" {'agg CPU µs/rank-step':>21} {'agg CPU':>8} {'RSS MiB':>8} {'stalls':>7} {'gen lag ms':>10} {'file':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['ranks']:>6} {r['rate']:>8g} {r['rank_steps_per_s']:>12,.0f} {r['sent']:>9,} {r['recorded']:>9,}"
            f" {r['lost']:>5,} {r['cpu_us_per_rank_step']:>21.1f} {100 * float(r['cpu_share']):>7.0f}%"
            f" {r['rss_mib']:>8.0f} {r['stalls']:>7,} {r['lag_ms']:>10.0f} {r['file']:>9}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--sweep-seconds", type=float, default=15.0)
    ap.add_argument("--sweep-rates", default="2,5,10,20,40")
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; generator and aggregator share them")
    with tempfile.TemporaryDirectory(prefix="bench_many_ranks-") as tmp_dir:
        tmp = Path(tmp_dir)
        show([scenario(tmp, 256, 10.0, args.seconds, 32), scenario(tmp, 1024, 1.0, args.seconds, 128)])
        if not args.no_sweep:
            print(f"\nsweep: 1,024 ranks, {args.sweep_seconds:g} s each")
            show([scenario(tmp, 1024, float(r), args.sweep_seconds, 128) for r in args.sweep_rates.split(",")])


if __name__ == "__main__":
    main()
