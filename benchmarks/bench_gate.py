"""How often the ``traceml compare`` gate cries wolf, and how often it catches a real slowdown (no assertions).

    .venv/bin/python benchmarks/bench_gate.py [--trials 10] [--steps 150] [--slowdown 0.25] [--out DIR]

Each *run* is a fresh process training a small MLP on the CPU (512-512-10, batch 64, SGD,
``torch.set_num_threads(1)``), recorded with ``traceml.init(out=...)`` and ``trace_step``.
A "B" run is the same code with a 25 % slowdown injected: inside each step, after the
optimizer, it busy-waits 25 % of that step's own compute time (so the slowdown is 25 % whatever
the host's speed, and contention slows the extra work as it slows the rest).

A trial records 9 runs, interleaved A1 B1 A4 A2 B2 A5 A3 B3 A6 so that load on the machine
hits A and B alike, and compares (in process, ``replay.compare.compare_sides``):

* 3 runs per side: A/A = A1-3 vs A4-6, A/B = A1-3 vs B1-3 (drift covered, no floor), with
  ``paired`` (A1 ran next to B1 and A4, ...: the i-th runs are resampled together) and without;
* 1 run per side: A/A pairs (A1, A4), (A2, A5), (A3, A6); A/B pairs (A1, B1), (A2, B2), (A3, B3);
  with the default 10 % floor, with no floor (the gate before drift was considered), and with a
  floor measured from an A/A pair (``--aa``: A2 for the pair A1/x, and so on).

It prints the false-regression rate (REGRESSION on A/A), the detection rate (REGRESSION on A/B)
and the share of INCONCLUSIVE verdicts per mode, and the A/A drift of the median step time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()


def worker(jobs: list[tuple[str, float]], steps: int, hidden: int) -> None:
    """Record each (path, slowdown) run in turn in this process (one torch import for several runs)."""
    import torch

    import traceml

    torch.set_num_threads(1)
    for out, slowdown in jobs:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(512, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x, y = torch.randn(128, 512), torch.randint(0, 10, (128,))
        traceml.init(out=out)
        for _ in range(steps):
            with traceml.trace_step(model):
                t0 = time.perf_counter()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if slowdown:
                    spin_until = time.perf_counter() + slowdown * (time.perf_counter() - t0)
                    while time.perf_counter() < spin_until:
                        pass
        traceml.shutdown()


def record(jobs: list[tuple[Path, float]], steps: int, hidden: int) -> None:
    """One fresh process records these runs (process start-up and layout vary between processes)."""
    spec = ",".join(f"{p}={s}" for p, s in jobs)
    cmd = [sys.executable, str(HERE), "--worker", spec, "--steps", str(steps), "--hidden", str(hidden)]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent.parent)}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, timeout=900)


def verdict(sides: dict[str, Any], base: list[str], new: list[str], resamples: int, seed: int, **kw: Any) -> str:
    from replay import compare as cp

    c = cp.compare_sides([sides[n] for n in base], [sides[n] for n in new], resamples=resamples, seed=seed, **kw)
    return c.verdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--slowdown", type=float, default=0.25)
    ap.add_argument("--hidden", type=int, default=1024, help="hidden width of the MLP (step cost)")
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--out", help="keep the recordings here (default: a temporary folder)")
    ap.add_argument("--reuse", action="store_true", help="with --out: compare recordings already there again")
    args = ap.parse_args()
    if args.worker:
        jobs = [(p, float(s)) for p, s in (item.rsplit("=", 1) for item in args.worker.split(","))]
        worker(jobs, args.steps, args.hidden)
        return

    from replay import compare as cp

    tmp = tempfile.TemporaryDirectory() if not args.out else None
    root = Path(args.out or (tmp.name if tmp else "."))
    root.mkdir(parents=True, exist_ok=True)
    order = ["A1", "B1", "A4", "A2", "B2", "A5", "A3", "B3", "A6"]
    modes = [
        "3 runs/side, --paired",
        "3 runs/side",
        "1 run/side, default floor",
        "1 run/side, --aa floor",
        "1 run/side, no floor",
    ]
    tally: dict[tuple[str, str], list[str]] = {(m, k): [] for m in modes for k in ("A/A", "A/B")}
    drift: list[float] = []
    started = time.monotonic()
    for trial in range(args.trials):
        sides: dict[str, cp.Side] = {}
        paths = {name: root / f"t{trial:02d}-{name}.tml" for name in order}
        for group in (order[0:3], order[3:6], order[6:9]):  # three processes of three runs each
            if args.reuse and all(paths[n].is_file() for n in group):
                continue
            jobs = [(paths[n], args.slowdown if n.startswith("B") else 0.0) for n in group]
            record(jobs, args.steps, args.hidden)
        for name in order:
            sides[name] = cp.load_side(paths[name])

        rs = (args.resamples, trial)
        three: tuple[tuple[str, dict[str, Any]], ...] = ((modes[0], {"paired": True}), (modes[1], {}))
        for m, kw in three:
            tally[(m, "A/A")].append(verdict(sides, ["A1", "A2", "A3"], ["A4", "A5", "A6"], *rs, **kw))
            tally[(m, "A/B")].append(verdict(sides, ["A1", "A2", "A3"], ["B1", "B2", "B3"], *rs, **kw))
        for i, (a, a2, b) in enumerate((("A1", "A4", "B1"), ("A2", "A5", "B2"), ("A3", "A6", "B3"))):
            partner = ["A2", "A3", "A1"][i]  # another A run of the trial: an A/A pair for the floor
            for kind, new in (("A/A", a2), ("A/B", b)):
                tally[(modes[2], kind)].append(verdict(sides, [a], [new], *rs))
                tally[(modes[3], kind)].append(verdict(sides, [a], [new], *rs, aa=[sides[partner]]))
                tally[(modes[4], kind)].append(verdict(sides, [a], [new], *rs, noise_floor_pct=0.0))
            sb = cp.metric(cp.compare_sides(sides[a], sides[a2], resamples=200), "step_time")
            drift.append(abs(sb.change_pct or 0.0))
        print(f"trial {trial + 1}/{args.trials} done ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)

    def rate(vs: list[str], what: str) -> str:
        return f"{sum(v == what for v in vs) / len(vs) * 100:5.1f}% ({sum(v == what for v in vs)}/{len(vs)})"

    print(
        f"\ntraceml compare gate: {args.trials} trials, {args.steps} steps per run, A/B = {args.slowdown:.0%} slowdown"
    )
    print(f"A/A drift of the median step time, one run vs one run: median {statistics.median(drift):.1f}%, ", end="")
    print(f"max {max(drift):.1f}% over {len(drift)} pairs\n")
    head = f"{'mode':28s}  {'false REGRESSION (A/A)':24s}  {'INCONCLUSIVE (A/A)':20s}  {'detected (A/B)':20s}  {'INCONCLUSIVE (A/B)':20s}"
    print(head)
    print("-" * len(head))
    for m in modes:
        aa, ab = tally[(m, "A/A")], tally[(m, "A/B")]
        print(
            f"{m:28s}  {rate(aa, cp.REGRESSION):24s}  {rate(aa, cp.INCONCLUSIVE):20s}  "
            f"{rate(ab, cp.REGRESSION):20s}  {rate(ab, cp.INCONCLUSIVE):20s}"
        )
    print(f"\n({time.monotonic() - started:.0f} s; recordings in {root if args.out else 'a temporary folder'})")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
