"""What "one answer per question" costs: the shared figures (traceml/views/measures.py) against the
cheaper per-rank statistics they replaced, on the same store, interleaved.

    python benchmarks/bench_views.py                    # 8 ranks x 10 k and 8 ranks x 200 k steps
    python benchmarks/bench_views.py --ranks 4 --steps 50000 --repeats 5

Rows of the table (median ms over the repeats, run in turn so load drifts hit both alike):

* ``live panel`` — :func:`traceml.views.live_model` (the job's last 100 steps, skew on the steps
  every rank has) against the baseline ``per-rank last 100``: each rank's own last 100 step
  times and their medians (what the live panel did before).
* ``dashboard stats`` — :func:`traceml.views.measures.view_measures` over the whole run (the
  job's median step, the skew on common steps, measured throughput, time outside steps) against
  the baseline ``pooled quantiles``: the median and p95 of every rank-step pooled, and each
  rank's median (what the dashboard's stats line did before).
* ``summary.json`` — :func:`traceml.diagnosis.build_summary` (one number for scale).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from traceml.diagnosis import build_summary
from traceml.store import StoreView
from traceml.testing.synthetic import store_from_run, synthetic_run
from traceml.views import live_model, quantiles_us
from traceml.views import measures as ms


def per_rank_last_100(view: StoreView) -> tuple[float, int]:
    medians = {}
    for r in view.table_ranks("step_time"):
        cols = view.columns("step_time", r)
        keep = np.flatnonzero(cols["failed"] == 0)[-100:]
        medians[r] = float(np.median(cols["step_us"][keep]))
    slowest = max(medians, key=lambda r: medians[r])
    return 100 * (medians[slowest] - min(medians.values())) / min(medians.values()), slowest


def pooled_quantiles(view: StoreView) -> tuple[list[float], list[float]]:
    chunks = [view.columns("step_time", r)["step_us"] for r in view.table_ranks("step_time")]
    return quantiles_us(chunks, [0.5, 0.95]), [float(np.median(c)) for c in chunks]


def dashboard_stats(view: StoreView) -> ms.JobMeasures:
    ms._MEMO.clear()  # measure the computation, not the memo
    return ms.view_measures(view, None, tuple(view.table_ranks("step_time")))


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--steps", type=int, nargs="*", default=[10_000, 200_000])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print("| store | what | new (ms) | baseline | baseline (ms) | ratio |")
    print("|---|---|---:|---|---:|---:|")
    for steps in args.steps:
        view = store_from_run(synthetic_run(ranks=args.ranks, steps=steps, seed=1, sample_every=1000)).snapshot()
        pairs = {
            "live panel": (lambda v=view: live_model(v), "per-rank last 100", lambda v=view: per_rank_last_100(v)),
            "dashboard stats": (
                lambda v=view: dashboard_stats(v),
                "pooled quantiles",
                lambda v=view: pooled_quantiles(v),
            ),
        }
        results: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in pairs}
        for _ in range(args.repeats):
            for name, (new, _label, base) in pairs.items():
                results[name][0].append(timed(new))
                results[name][1].append(timed(base))
        label = f"{args.ranks} ranks x {steps:,} steps"
        for name, (new_t, base_t) in results.items():
            n, b = float(np.median(new_t)), float(np.median(base_t))
            print(f"| {label} | {name} | {n:.1f} | {pairs[name][1]} | {b:.1f} | {n / b:.1f}x |")
        summary = float(np.median([timed(lambda v=view: build_summary(v)) for _ in range(args.repeats)]))
        print(f"| {label} | summary.json (build_summary) | {summary:.1f} | — | — | — |")


if __name__ == "__main__":
    main()
