"""SIGKILL one rank of a 2-rank ``traceml run``: the aggregator notices at once, records which
rank died and when (``ranks`` attachment, state ``died`` with ``died_ns``), finishes the file,
and ``traceml run`` returns the failure code (128 + SIGKILL)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import fault_harness as h

from traceml.format import open_recording

pytestmark = pytest.mark.slow
#: between the kill and the aggregator's "died" (the OS closes the socket of a killed process)
NOTICE_BOUND_S = 3.0
LAG_BOUND_S = 2.5


def test_a_killed_rank_is_recorded_as_died_and_the_run_fails(tmp_path: Path) -> None:
    out = tmp_path / "run.tml"
    args = ["--steps", "1000", "--rate", "100", "--kill-rank", "1", "--kill-at", "100"]
    run = h.LiveRun(["--ui", "none", "--out", str(out), "--nproc-per-node", "2", h.FAULT_STEPS, *args], tmp_path)
    try:
        kill_ns = int(run.wait_for(r"^sigkill rank=1 step=100 ns=(\d+)").group(1))
    finally:
        code = run.finish()
    assert code == 128 + signal.SIGKILL, run.err[-3000:]

    rec = open_recording(out)
    assert rec.integrity["status"] == "complete", rec.integrity
    ranks = {r["rank"]: r for r in rec.attachments["ranks"]["ranks"]}
    dead = ranks[1]
    assert dead["state"] == "died" and dead["exit_status"] == "", dead
    assert 0 <= dead["died_ns"] - kill_ns < NOTICE_BOUND_S * 1e9, (
        f"died {(dead['died_ns'] - kill_ns) / 1e9:.2f} s after the kill"
    )
    # torchrun stops the surviving rank after the failure: it finished or died, but after rank 1
    assert ranks[0]["state"] in ("died", "finished"), ranks[0]
    if ranks[0]["state"] == "died":
        assert ranks[0]["died_ns"] >= dead["died_ns"]
    exit_doc = rec.attachments["exit"]
    assert exit_doc["status"] == "failed" and exit_doc["exit_code"] == 128 + signal.SIGKILL, exit_doc

    steps = rec.read_table("step_time")
    dead_steps = steps[1]["step"].tolist()
    assert dead_steps == list(range(len(dead_steps))) and len(dead_steps) <= 100
    assert (kill_ns - int(steps[1]["ts_ns"].max())) / 1e9 < LAG_BOUND_S, "the dead rank's last second is recorded"
    assert "rank 1 disconnected without finishing" in run.err
    assert "rank 1: died" in run.out, run.out[-2000:]
