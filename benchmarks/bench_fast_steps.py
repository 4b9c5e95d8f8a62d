"""Fast steps: rows lost on the rank at paced step rates, before and after the early drain (no assertions).

    .venv/bin/python benchmarks/bench_fast_steps.py [--seconds 3] [--rates 1000,10000,30000,0] [--rounds 2]

Each measurement is one real process that records itself (``TRACEML_OUT``) while stepping an
empty ``with traceml.trace_step(): pass`` at a paced rate (busy-waiting to each step's
deadline; rate 0 = as fast as the loop goes).  Two modes run interleaved, round after round:

* ``fixed``: the rank buffers as before this change: the sender drains every 0.5 s and a
  table keeps 16,384 rows (the early wake-up and the growth switched off in the process);
* ``drain``: as shipped: half-full tables wake the sender, and a table that fills between two
  flushes grows up to 131,072 rows.

It prints steps done, the achieved rate, rows recorded, rows counted lost, and the largest
capacity the step table reached (``cap``).  A final line runs ``traceml run --nproc-per-node 2``
at 10,000 steps/s per rank through a real aggregator.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LOOP = r"""
import json, os, sys, time
import traceml
mode, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
agent = traceml.init()
if mode == "fixed" and agent is not None and agent.sender is not None:
    agent.sender.max_capacity = {}
    for table in agent.tables.values():
        table.on_high_water = None
table = agent.tables["step_time"] if agent is not None else None
cap = table.capacity if table else 0
period = 1.0 / rate if rate > 0 else 0.0
t0 = time.perf_counter()
end = t0 + seconds
n = 0
nxt = t0
while True:
    now = time.perf_counter()
    if now >= end:
        break
    if period:
        while now < nxt:
            now = time.perf_counter()
        nxt += period
    with traceml.trace_step():
        pass
    n += 1
    if table is not None and (n & 1023) == 0:
        cap = max(cap, table.capacity)
elapsed = time.perf_counter() - t0
cap = max(cap, table.capacity) if table else cap
print(json.dumps({"steps": n, "elapsed": elapsed, "cap": cap}))
"""


def run_one(mode: str, rate: float, seconds: float, tmp: Path) -> dict[str, float]:
    import json

    import replay

    script = tmp / "loop.py"
    script.write_text(LOOP)
    out = tmp / f"{mode}-{int(rate)}.tml"
    out.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRACEML_OUT": str(out)}
    r = subprocess.run(
        [sys.executable, str(script), mode, str(rate), str(seconds)], env=env, capture_output=True, text=True
    )
    if r.returncode != 0:
        raise SystemExit(f"the loop failed: {r.stderr[-2000:]}")
    info = json.loads(r.stdout.strip().splitlines()[-1])
    with replay.open(out) as rec:
        rows = sum(len(c["step"]) for c in rec.columns("step_time").values())
        lost = sum(i.drops.get("step_time", 0) for i in rec.view().rank_info.values())
    return {**info, "rows": rows, "lost": lost}


def run_two_ranks(rate: float, seconds: float, tmp: Path) -> str:
    import replay

    script = tmp / "loop.py"
    script.write_text(LOOP)
    out = tmp / "two.tml"
    traceml = str(Path(sys.executable).parent / "traceml")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [traceml, "run", "--ui", "none", "--nproc-per-node", "2", "--out", str(out), str(script), "drain", str(rate),
         str(seconds)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if r.returncode != 0:
        return f"traceml run failed: {r.stderr[-500:]}"
    with replay.open(out) as rec:
        rows = {rank: len(c["step"]) for rank, c in rec.columns("step_time").items()}
        lost = {rank: i.drops.get("step_time", 0) for rank, i in rec.view().rank_info.items()}
    return f"traceml run, 2 ranks at {rate:,.0f} steps/s for {seconds:g} s: rows {rows}, lost {lost}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rates", default="1000,10000,30000,0", help="steps/s per rank; 0 = unpaced")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    rates = [float(x) for x in args.rates.split(",")]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.seconds:g} s per run")
    header = f"{'mode':6} {'target/s':>9} {'steps':>9} {'achieved/s':>11} {'recorded':>9} {'lost':>8} {'cap':>7}"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for _ in range(args.rounds):
            for rate in rates:
                for mode in ("fixed", "drain"):
                    m = run_one(mode, rate, args.seconds, tmp)
                    target = "max" if rate == 0 else f"{rate:,.0f}"
                    print(
                        f"{mode:6} {target:>9} {m['steps']:>9,} {m['steps'] / m['elapsed']:>11,.0f}"
                        f" {m['rows']:>9,} {m['lost']:>8,} {m['cap']:>7,}",
                        flush=True,
                    )
        t = time.perf_counter()
        print(run_two_ranks(10_000, args.seconds, tmp), f"({time.perf_counter() - t:.1f} s wall)")


if __name__ == "__main__":
    main()
