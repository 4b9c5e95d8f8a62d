"""How soon the live view names a rank that slows down mid-run (no assertions; prints a table).

    python benchmarks/bench_live_latency.py

A synthetic 2-rank DDP run (steps synchronised by the all-reduce, ±2 % noise per phase) runs at
a given step rate; ``--onset`` seconds in, rank 1 spends 20 % of a step more before its forward
(the others wait for it inside backward).  The store is filled second by second as the
aggregator's would be, and after each second two live signals are read:

* the live verdict (``traceml.diagnosis.live.live_verdict``: the diagnosis of the last
  ``LIVE_WINDOW_S`` seconds of steps, at least ``LIVE_MIN_STEPS``, at most ``RECENT_STEPS``):
  seconds until its primary finding is ``STRAGGLER`` naming rank 1;
* the rank skew over the last 100 steps (``traceml.views.live.rank_skew``, what the live view
  showed before): seconds until it crosses 10 %.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from traceml.diagnosis.live import live_verdict
from traceml.schema import STEP_TIME, rows_to_columns
from traceml.store import ColumnStore
from traceml.views.live import rank_skew

STEP_US = 100_000.0  # the step before the slowdown, scaled by the rate below


def simulate(rate: float, onset_s: float, horizon_s: float, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    step_us = 1e6 / rate
    store = ColumnStore()
    t_ns = 10**18
    step = 0
    verdict_at = skew_at = float("nan")
    pending: dict[int, list[tuple[int, ...]]] = {0: [], 1: []}
    second_end = t_ns + 1_000_000_000
    while True:
        elapsed = (t_ns - 10**18) / 1e9
        if elapsed >= horizon_s:
            break
        slow = elapsed >= onset_s
        extra = 0.2 * step_us if slow else 0.0
        fwd, bwd, opt = 0.3 * step_us, 0.6 * step_us, 0.1 * step_us
        whole = step_us + extra
        t_ns += int(whole * 1000)
        for r in (0, 1):
            n = rng.normal(1.0, 0.02, 3)
            f, b, o = fwd * n[0], bwd * n[1], opt * n[2]
            if r == 1:
                f += extra  # the slow rank's own time, before its all-reduce
            else:
                b += extra  # the others wait for it inside backward
            res = max(0.0, whole - f - b - o)
            pending[r].append((step, t_ns, 0, int(whole), 0, 0, int(f), int(b), int(o), int(res)))
        step += 1
        if t_ns >= second_end:
            for r, rows in pending.items():
                store.append(r, "step_time", rows_to_columns(STEP_TIME, rows), schema=STEP_TIME)
                rows.clear()
            second_end += 1_000_000_000
            view = store.snapshot()
            now = (t_ns - 10**18) / 1e9
            if now < onset_s:
                continue
            if np.isnan(verdict_at):
                f = live_verdict(view)
                if f is not None and f.kind == "STRAGGLER" and f.rank == 1:
                    verdict_at = now - onset_s
            if np.isnan(skew_at):
                skew, slowest = rank_skew(view, 100)
                if skew >= 10 and slowest == 1:
                    skew_at = now - onset_s
            if not np.isnan(verdict_at) and not np.isnan(skew_at):
                break
    return verdict_at, skew_at


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--onset", type=float, default=30.0)
    p.add_argument("--horizon", type=float, default=200.0)
    args = p.parse_args()
    print(f"rank 1 slows by +20% of a step {args.onset:.0f} s into a 2-rank DDP run; seconds until named")
    print(f"{'steps/s':>8} {'live verdict':>13} {'skew >= 10% (last 100 steps)':>30}")
    for rate in (1.0, 2.0, 5.0, 10.0, 50.0):
        v, s = simulate(rate, args.onset, args.horizon)
        fmt = lambda x: "not within horizon" if np.isnan(x) else f"{x:.1f} s"  # noqa: E731
        print(f"{rate:8.0f} {fmt(v):>13} {fmt(s):>30}")


if __name__ == "__main__":
    main()
