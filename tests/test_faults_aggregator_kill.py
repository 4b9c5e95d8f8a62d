"""SIGKILL the aggregator of a real ``traceml run`` at three moments: before any rank connected,
at a random moment mid-run (a torch training), and while the run is closing.  Every time the
training exits 0 with the same final loss as an untraced run, the recording is readable up to
about a second before the kill, and ``traceml inspect`` says it was recovered.

The three runs go in parallel (this machine has 2 cores; each run's startup is mostly torch
imports).  ``benchmarks/bench_faults_kill_aggregator.py`` does the same 100 times.
"""

from __future__ import annotations

import random
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import fault_harness as h

from traceml.format import open_recording

pytestmark = pytest.mark.slow
#: the recording holds every step that ended this long before the kill: sender period (0.5 s)
#: + segment time bound (1 s) + spool tick (0.2 s), with slack for a loaded 2-core machine
LAG_BOUND_S = 2.5
TORCH_ARGS = ["--steps", "300", "--step-sleep", "0.01", "--log-every", "10"]
STEPS_ARGS = ["--steps", "400", "--rate", "200"]


@dataclass
class Outcome:
    moment: str
    code: int
    loss: float
    reference: float
    kill_ns: int
    path: Path
    err: str


def _has_steps(path: Path) -> bool:
    try:
        with open_recording(path) as rec:
            return bool(rec.read_table("step_time"))
    except Exception:
        return False


def run_and_kill(moment: str, tmp: Path, rng: random.Random) -> Outcome:
    tmp.mkdir()
    script, args = (h.FAULT_TRAIN, TORCH_ARGS) if moment == "mid-run" else (h.FAULT_STEPS, STEPS_ARGS)
    bare = h.bare_run(script, args, tmp)
    out = tmp / "run.tml"
    run = h.LiveRun(["--ui", "none", "--out", str(out), script, *args], tmp)
    try:
        agg = run.aggregator()
        if moment == "before-ranks":
            deadline = time.monotonic() + 60
            while not (out.exists() and out.stat().st_size > 0) and time.monotonic() < deadline:
                time.sleep(0.005)
        elif moment == "mid-run":
            run.wait_for(r"^step 0 ")
            # kill at a random moment once the file holds steps: a kill before the first
            # segment reached the disk leaves no step to check the loss window against
            deadline = time.monotonic() + 60
            while not _has_steps(out) and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 1.0))
        else:  # closing: the training printed its result and is shutting down
            run.wait_for(r"^final loss ")
        kill_ns = time.time_ns()
        agg.send_signal(signal.SIGKILL)
    finally:
        code = run.finish()
        bare_out, _ = bare.communicate(timeout=120)
    return Outcome(moment, code, h.final_loss(run.out), h.final_loss(bare_out), kill_ns, out, run.err)


def test_killing_the_aggregator_never_harms_the_training_and_keeps_the_recording(tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    moments = ["before-ranks", "mid-run", "closing"]
    with ThreadPoolExecutor(len(moments)) as pool:
        outcomes = list(pool.map(lambda m: run_and_kill(m, tmp_path / m, rng), moments))
    for o in outcomes:
        where = f"kill {o.moment} (seed {seed}): {o.err[-1500:]}"
        assert o.code == 0, where
        assert o.loss == o.reference, where
        rec = open_recording(o.path)
        assert rec.integrity["status"] in ("recovered", "complete"), where
        cols = rec.read_table("step_time").get(0)
        steps = [] if cols is None else cols["step"].tolist()
        assert steps == list(range(len(steps))), f"steps must be contiguous from 0; {where}"
        if o.moment == "mid-run":
            assert rec.integrity["status"] == "recovered", where
            assert cols is not None, where
            lag_s = (o.kill_ns - int(cols["ts_ns"].max())) / 1e9
            assert lag_s < LAG_BOUND_S, f"the last recorded step ended {lag_s:.2f} s before the kill; {where}"
            assert "the aggregator exited early" in o.err
        if o.moment == "before-ranks":
            assert steps == [], where
        code, text = h.inspect_text(o.path)
        assert code == 0, text
        if rec.integrity["status"] == "recovered":
            assert "recovered: the writer did not finish" in text, text
            for skipped in rec.integrity["skipped"]:
                assert f"skipped {skipped['length']:,} bytes" in text, text
