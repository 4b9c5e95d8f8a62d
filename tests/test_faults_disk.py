"""Disk full and unwritable output: the training goes on, one clear error is printed, and the
file stays valid up to its last good segment.

The disk-full run records onto a 24 KiB tmpfs (``mount -t tmpfs``, as root; skipped cleanly
where mounting is not permitted).  An output path whose parent is a FILE is tested on the
aggregator process and on ``traceml run``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import fault_harness as h

from traceml.aggregator.control import exit_line
from traceml.cli.launch_plan import free_port
from traceml.format import open_recording
from traceml.schema import PHASES, STEP_TIME, rows_to_columns
from traceml.transport import RankIdentity, TelemetryClient, batch, encode_columns, hello, rank_finished

pytestmark = pytest.mark.slow
STEPS_ARGS = ["--steps", "3000", "--rate", "1000", "--regions", "20"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 KiB tmpfs: room for the header and about one segment of this run."""
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("needs root and mount(8) to make a small tmpfs")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def recording_errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if "recording stopped" in line]


def test_a_full_disk_stops_the_recording_not_the_training(small_disk: Path, tmp_path: Path) -> None:
    bare = h.bare_run(h.FAULT_STEPS, STEPS_ARGS, tmp_path)
    out = small_disk / "run.tml"
    run = h.LiveRun(["--ui", "none", "--out", str(out), h.FAULT_STEPS, *STEPS_ARGS], tmp_path)
    code = run.finish()
    bare_out, _ = bare.communicate(timeout=120)
    assert code == 0, run.err[-3000:]
    assert h.final_loss(run.out) == h.final_loss(bare_out)
    assert "done rank=0 steps=3000" in run.out
    errors = recording_errors(run.err)
    assert len(errors) == 1, f"expected one clear error, found {errors}"
    assert "No space left on device" in errors[0] and str(out) in errors[0]
    assert "traceml summary" in run.out, "the live side finished the run as usual"

    rec = open_recording(out)
    assert rec.integrity["status"] == "recovered" and rec.integrity["skipped"] == [], rec.integrity
    assert len(rec.segments) >= 1
    steps = rec.read_table("step_time")[0]["step"].tolist()
    assert 0 < len(steps) < 3000 and steps == list(range(len(steps)))
    regions = rec.read_table("step_region")[0]
    assert set(regions["step"].tolist()) <= set(steps)
    code, text = h.inspect_text(out)
    assert code == 0 and "recovered" in text, text


def ident() -> RankIdentity:
    return RankIdentity(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0, host="h", pid=os.getpid())


def test_an_output_under_a_file_leaves_the_aggregator_serving(tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    port = free_port()
    env = h.clean_env(TRACEML_TOKEN="tok")
    cmd = [sys.executable, "-m", "traceml.aggregator", "--port", str(port), "--run-id", "r", "--control-stdin"]
    cmd += ["--out", str(blocker / "run.tml"), "--run-name", "blocked"]
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        client = TelemetryClient("127.0.0.1", port, hello("r", "tok", ident()), connect_timeout_s=2.0)
        for b in range(4):
            rows = [(s, 1_000 + s, 0, 500, *([50] * len(PHASES))) for s in range(b * 10, b * 10 + 10)]
            client.send(batch(b + 1, {"step_time": encode_columns(STEP_TIME, rows_to_columns(STEP_TIME, rows))}))
            client.flush(timeout_s=10)
        client.send(rank_finished("ok"))
        client.close(drain_timeout_s=10)
        assert client.dropped_messages == 0
        out, err = proc.communicate(exit_line(0, "", 1.0), timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    errors = recording_errors(err.decode())
    assert len(errors) == 1 and "cannot open" in errors[0] and str(blocker) in errors[0], err.decode()
    assert "40 rank-steps" in out.decode(), "every row reached the live store"
    assert blocker.read_text() == "not a directory"


def test_traceml_run_with_an_output_under_a_file_still_trains(tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    args = ["--steps", "50"]
    bare = h.bare_run(h.FAULT_STEPS, args, tmp_path)
    run = h.LiveRun(["--ui", "none", "--out", str(blocker / "run.tml"), h.FAULT_STEPS, *args], tmp_path)
    code = run.finish()
    bare_out, _ = bare.communicate(timeout=120)
    assert "Traceback" not in run.err, run.err[-2000:]
    assert code == 0
    assert "done rank=0 steps=50" in run.out and h.final_loss(run.out) == h.final_loss(bare_out)
    errors = recording_errors(run.err)
    assert len(errors) == 1 and str(blocker) in errors[0], run.err[-2000:]
    assert blocker.read_text() == "not a directory"
