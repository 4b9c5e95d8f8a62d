"""Peak memory of ``replay --follow``'s tail against the rows of a recording being written (no assertions).

    .venv/bin/python benchmarks/bench_follow_memory.py FILE.tml [--budgets 1000000000,1000000,200000]

Each budget runs in its own process: ``replay.tail.Tail(rec, budget=B)`` opened on FILE with
``follow=True`` and polled once; prints the rows in the file, the rows the tail holds and the peak
resident set (``getrusage``).  A file without a footer is followed as a live one (cut a finished
recording short, e.g. ``head -c N run.tml > open.tml``); a budget above the file's rows holds every
row, as the tail did before it was bounded.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(path: str, budget: int) -> None:
    import replay
    from replay.tail import Tail

    with replay.open(path, follow=True, progress=False) as rec:
        tail = Tail(rec, budget=budget)
        tail.poll()
        rows = sum(rec.rows.values())
        held = tail.held() if not tail.finished else tail.latest().total_rows()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"| {rows:,} | {budget:,} | {held:,} | {peak:.0f} MiB |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--budgets", default="1000000000,1000000,200000")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        one(args.file, args.one)
        return
    print("| rows in the file | row budget | rows held | peak RSS |\n|---:|---:|---:|---:|", flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for budget in (int(b) for b in args.budgets.split(",")):
        subprocess.run([sys.executable, __file__, args.file, "--one", str(budget)], env=env, check=True)


if __name__ == "__main__":
    main()
