"""What one ``traceml run --otlp`` push costs the aggregator (no assertions).

    .venv/bin/python benchmarks/bench_otlp_push.py              # 3 store sizes, 5 rounds each
    .venv/bin/python benchmarks/bench_otlp_push.py --rounds 3

Every ``--otlp-interval`` seconds the aggregator's push thread takes a snapshot of the live store,
builds the run summary (the diagnosis included) and sends it through the OpenTelemetry SDK to a
collector.  This measures those three parts on live stores filled with synthetic runs
(``traceml.testing.synthetic``, GPU tables included) and sends to a real OTLP/HTTP receiver on
127.0.0.1 (``tests/otlp_receiver.py``), interleaved in each round.  "x send" is the whole push
against its OTLP send alone (the baseline, measured in the same rounds): the summary is the
cost.  Then the push's share of one core at the default 15 s interval, and the interval the
push thread actually keeps (at least MAX_DUTY times the last push) with its share of a core.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.otlp_receiver import OtlpReceiver
from traceml.diagnosis.summary import build_summary
from traceml.exports.otlp import MAX_DUTY, metric_points, send_summary
from traceml.testing.synthetic import store_from_run, synthetic_run

SIZES = ((2, 5_000), (8, 25_000), (32, 6_250))  # ranks x steps held in the live store


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--interval", type=float, default=15.0, help="push interval for the last column")
    args = p.parse_args()
    rows = []
    with OtlpReceiver() as rx:
        for ranks, steps in SIZES:
            store = store_from_run(synthetic_run(ranks, steps, gpu=True, nodes=max(1, ranks // 8)), capacity=200_000)
            snap, summ, send = [], [], []
            points = 0
            for _ in range(args.rounds):  # the parts interleaved in each round
                t0 = time.perf_counter()
                view = store.snapshot()
                t1 = time.perf_counter()
                summary = build_summary(view)
                t2 = time.perf_counter()
                send_summary(summary, endpoint=rx.url)
                t3 = time.perf_counter()
                snap.append(t1 - t0)
                summ.append(t2 - t1)
                send.append(t3 - t2)
                points = sum(len(r.points) for r in metric_points(summary))
            total = statistics.median(snap) + statistics.median(summ) + statistics.median(send)
            rows.append(
                (
                    f"{ranks} x {steps:,}",
                    f"{ranks * steps:,}",
                    points,
                    statistics.median(snap) * 1e3,
                    statistics.median(summ) * 1e3,
                    statistics.median(send) * 1e3,
                    total * 1e3,
                    total / max(statistics.median(send), 1e-9),
                    100 * total / args.interval,
                    max(args.interval, total * MAX_DUTY),
                    100 * total / max(args.interval, total * MAX_DUTY),
                )
            )
    print(
        f"{'ranks x steps':>15} {'step rows':>10} {'points':>7} {'snapshot ms':>12} {'summary ms':>11}"
        f" {'OTLP send ms':>13} {'push ms':>8} {'x send':>7} {'% core @' + format(args.interval, 'g') + 's':>12}"
        f" {'adaptive s':>11} {'% core':>7}"
    )
    for name, nrows, pts, a, b, c, t, ratio, share, every, duty in rows:
        print(
            f"{name:>15} {nrows:>10} {pts:>7} {a:>12.1f} {b:>11.1f} {c:>13.1f} {t:>8.1f} {ratio:>7.1f} {share:>12.2f}"
            f" {every:>11.1f} {duty:>7.2f}"
        )


if __name__ == "__main__":
    main()
