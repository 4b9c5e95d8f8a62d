"""SIGKILL the aggregator of a real ``traceml run`` at a random moment, 100 times.

    python benchmarks/bench_faults_kill_aggregator.py                  # 100 kills, one run at a time
    python benchmarks/bench_faults_kill_aggregator.py --kills 20 --jobs 2

The training is ``tests/scripts/fault_train.py`` (a torch MLP, deterministic seed,
``torch.set_num_threads(1)``; it prints its final loss).  First the untraced reference run
(plain python) and one traced run without a kill measure the final loss and how long a traced
run takes (T).  Then every run is killed at a moment drawn uniformly from [0, T] after launch,
so kills land during start-up (before a rank connected), during training and while the run
closes.  For every run: does the training exit 0 with the reference's final loss; is the
recording readable; how long before the kill did the last recorded step end (the "lag"); does
``traceml inspect`` read it and say it was recovered.  Prints a table per phase of the kill.
"""

from __future__ import annotations

import argparse
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "scripts"))
import fault_harness as h

from traceml.errors import TracemlError
from traceml.format import open_recording

PHASES = ("start-up", "training", "closing", "after the end")


@dataclass
class Kill:
    n: int
    delay_s: float
    phase: str = ""
    code: int = -1
    loss_equal: bool = False
    file: str = "missing"  # missing | recovered | complete | damaged | unreadable
    contiguous: bool = True
    rows: int = 0
    lag_s: float | None = None
    inspect_ok: bool = False
    wall_s: float = 0.0


def one_run(n: int, work: Path, args: list[str], delay_s: float | None, reference: float) -> Kill:
    tmp = work / f"run{n:03d}"
    tmp.mkdir()
    out = tmp / "run.tml"
    k = Kill(n, delay_s if delay_s is not None else float("nan"))
    started = time.monotonic()
    run = h.LiveRun(["--ui", "none", "--out", str(out), h.FAULT_TRAIN, *args], tmp)
    kill_ns = 0
    try:
        if delay_s is not None:
            agg = run.aggregator()
            time.sleep(max(0.0, delay_s - (time.monotonic() - started)))
            seen_step = any(line.startswith("step 0 ") for line in run.lines["stdout"])
            seen_end = any(line.startswith("final loss ") for line in run.lines["stdout"])
            kill_ns = time.time_ns()
            if agg.is_running():
                agg.send_signal(signal.SIGKILL)
                k.phase = "closing" if seen_end else "training" if seen_step else "start-up"
            else:
                k.phase = "after the end"
    finally:
        k.code = run.finish(timeout=600)
    k.wall_s = time.monotonic() - started
    try:
        k.loss_equal = h.final_loss(run.out) == reference
    except AssertionError:
        k.loss_equal = False
    if out.exists():
        try:
            with open_recording(out) as rec:
                k.file = rec.integrity["status"]
                cols = rec.read_table("step_time").get(0)
            if cols is not None:
                steps = cols["step"].tolist()
                k.rows = len(steps)
                k.contiguous = steps == list(range(len(steps)))
                if kill_ns and k.phase == "training":
                    k.lag_s = (kill_ns - int(cols["ts_ns"].max())) / 1e9
        except TracemlError:
            k.file = "unreadable"
        code, text = h.inspect_text(out)
        k.inspect_ok = code == 0 and (k.file != "recovered" or "recovered" in text)
    return k


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=100)
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--step-sleep", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    opts = p.parse_args()
    train_args = ["--steps", str(opts.steps), "--step-sleep", str(opts.step_sleep), "--log-every", "10"]
    rng = random.Random(opts.seed)
    lock = threading.Lock()

    with tempfile.TemporaryDirectory(prefix="bench_kill-") as tmp:
        work = Path(tmp)
        bare = h.bare_run(h.FAULT_TRAIN, train_args, work)
        reference = h.final_loss(bare.communicate(timeout=600)[0])
        calib = one_run(0, work, train_args, None, reference)
        if calib.code != 0 or not calib.loss_equal or calib.file != "complete":
            raise SystemExit(f"the run without a kill is not clean: {calib}")
        horizon = calib.wall_s
        print(
            f"reference final loss {reference!r}; an undisturbed traced run takes {horizon:.1f} s (kills drawn in [0, {horizon:.1f}] s)",
            flush=True,
        )
        delays = [rng.uniform(0.0, horizon) for _ in range(opts.kills)]
        done: list[Kill] = []

        def job(i: int) -> Kill:
            k = one_run(i + 1, work, train_args, delays[i], reference)
            with lock:
                done.append(k)
                read_back = k.inspect_ok or k.file == "missing"  # killed before the spool created the file
                bad = "" if k.code == 0 and k.loss_equal and read_back and k.contiguous else "  <-- FAILED"
                lag = "-" if k.lag_s is None else f"{k.lag_s:.2f}s"
                print(
                    f"[{len(done):3}/{opts.kills}] kill at {k.delay_s:5.1f}s ({k.phase:13}) exit {k.code} loss {'=' if k.loss_equal else '!='}"
                    f" file {k.file:10} rows {k.rows:4} lag {lag}{bad}",
                    flush=True,
                )
            return k

        with ThreadPoolExecutor(max(1, opts.jobs)) as pool:
            kills = list(pool.map(job, range(opts.kills)))

    print(
        f"\n{opts.kills} kills of the aggregator, {opts.jobs} run(s) at a time; fault_train.py --steps {opts.steps} --step-sleep {opts.step_sleep}\n"
    )
    head = f"{'killed during':14} {'runs':>5} {'exit 0':>7} {'same loss':>10} {'file read':>10} {'recovered':>10} {'contiguous':>11} {'inspect ok':>11} {'lag p50':>8} {'lag p95':>8} {'lag max':>8}"
    print(head)
    print("-" * len(head))
    for phase in (*PHASES, "all"):
        ks = [k for k in kills if phase in ("all", k.phase)]
        if not ks:
            continue
        lags = sorted(k.lag_s for k in ks if k.lag_s is not None)

        def pct(q: float, lags: list[float] = lags) -> str:
            return "-" if not lags else f"{lags[min(len(lags) - 1, int(q * len(lags)))]:.2f}s"

        readable = [k for k in ks if k.file in ("recovered", "complete", "damaged")]
        print(
            f"{phase:14} {len(ks):5} {sum(k.code == 0 for k in ks):7} {sum(k.loss_equal for k in ks):10} "
            f"{len(readable):10} {sum(k.file == 'recovered' for k in ks):10} {sum(k.contiguous for k in ks):11} "
            f"{sum(k.inspect_ok for k in readable):11} {pct(0.5):>8} {pct(0.95):>8} {(f'{lags[-1]:.2f}s' if lags else '-'):>8}"
        )
    missing = [k for k in kills if k.file == "missing"]
    if missing:
        print(
            f"\nno recording file at all: {len(missing)} run(s), killed at {', '.join(f'{k.delay_s:.2f}s' for k in missing)} (before the spool opened it)"
        )
    walls = [k.wall_s for k in kills]
    print(f"\nrun wall time with a kill: median {statistics.median(walls):.1f} s (undisturbed {horizon:.1f} s)")
    print("lag = kill time minus the end of the last recorded step, for kills during training.")
    ok = all(k.code == 0 and k.loss_equal and k.contiguous and (k.file == "missing" or k.inspect_ok) for k in kills)
    print(f"every training exited 0 with the reference loss and every recording read back: {'YES' if ok else 'NO'}")


if __name__ == "__main__":
    main()
