"""``traceml run`` end to end with real processes: torchrun (gloo), the rank runtime, the
aggregator process and the recording it leaves, read back with open_recording."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import numpy as np
import psutil
import pytest

from traceml.format import open_recording

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TRACEML = str(Path(sys.executable).parent / "traceml")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
DEMO = str(ROOT / "examples" / "demo_train.py")
DDP = str(ROOT / "examples" / "ddp_train.py")


def traceml_run(tmp_path: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    cmd = [TRACEML, "run", "--ui", "none", "--out", str(tmp_path / "run.tml"), *args]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


def steps_by_rank(path: Path) -> dict[int, list[int]]:
    return {rank: cols["step"].tolist() for rank, cols in open_recording(path).read_table("step_time").items()}


def wait_for_rows(path: Path, n: int, run: LiveRun | None = None, timeout: float = 60) -> None:
    """Read the growing recording until rank 0 has ``n`` step rows in it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = len(open_recording(path).read_table("step_time").get(0, {}).get("step", ()))
        except Exception:
            got = 0
        if got >= n:
            return
        assert time.monotonic() < deadline, f"{path} never held {n} step rows ({run.lines if run else ''})"
        time.sleep(0.05)


class LiveRun:
    """``traceml run`` in the background, its stdout and stderr read line by line."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        cmd = [TRACEML, "run", "--ui", "none", "--out", str(tmp_path / "run.tml"), *args]
        self.proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._seen = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, "stdout"), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, "stderr"), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, pipe: IO[str], name: str) -> None:
        for line in pipe:
            with self._seen:
                self.lines[name].append(line)
                self._seen.notify_all()

    def wait_for_line(self, text: str, stream: str = "stdout", timeout: float = 120) -> None:
        def seen() -> bool:
            return any(text in line for line in self.lines[stream])

        with self._seen:
            self._seen.wait_for(lambda: seen() or self.proc.poll() is not None, timeout)
            assert seen(), f"never printed {text!r} on {stream}: {self.lines}"

    def aggregator(self) -> psutil.Process:
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            if "traceml.aggregator" in " ".join(child.cmdline()):
                return child
        raise AssertionError("no aggregator process under traceml run")

    def finish(self, timeout: float = 120) -> int:
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                for p in psutil.Process(self.proc.pid).children(recursive=True):
                    p.kill()
                self.proc.kill()
                self.proc.wait()
            for reader in self._readers:
                reader.join(10)
        return code

    @property
    def out(self) -> str:
        return "".join(self.lines["stdout"])

    @property
    def stderr(self) -> str:
        return "".join(self.lines["stderr"])


def test_one_rank_records_every_step_and_keeps_the_output(tmp_path: Path) -> None:
    res = traceml_run(tmp_path, DEMO, "--steps", "40", "--log-every", "20", "--input-cost", "0")
    assert res.returncode == 0, res.stderr
    assert steps_by_rank(tmp_path / "run.tml") == {0: list(range(40))}
    assert "step 20/40" in res.stdout and "done: 40 steps" in res.stdout
    assert "done: 40 steps" in (tmp_path / "stdout.log").read_text()
    assert f"recording: {tmp_path / 'run.tml'}" in res.stdout.splitlines()[-1]
    assert "traceml summary" in res.stdout
    rec = open_recording(tmp_path / "run.tml")
    assert rec.integrity["status"] == "complete"
    assert rec.attachments["exit"]["exit_code"] == 0 and rec.attachments["exit"]["status"] == "ok"
    assert rec.attachments["ranks"]["ranks"][0]["state"] == "finished"
    assert "environment/rank0" in rec.attachments and "summary" in rec.attachments


def test_two_ranks_gloo_every_step_of_every_rank(tmp_path: Path) -> None:
    res = traceml_run(tmp_path, "--nproc-per-node", "2", DDP, "--steps", "15", "--log-every", "5")
    assert res.returncode == 0, res.stderr
    assert steps_by_rank(tmp_path / "run.tml") == {0: list(range(15)), 1: list(range(15))}
    rec = open_recording(tmp_path / "run.tml")
    assert sorted((r["rank"], r["state"]) for r in rec.attachments["ranks"]["ranks"]) == [
        (0, "finished"),
        (1, "finished"),
    ]
    assert rec.attachments["summary"]["run"]["world_size"] == 2


def test_a_script_that_raises_exits_with_its_code_and_keeps_its_steps(tmp_path: Path) -> None:
    script = tmp_path / "boom.py"
    script.write_text(
        "import traceml\n"
        "for step in range(30):\n"
        "    with traceml.trace_step():\n"
        "        if step == 7:\n"
        "            raise RuntimeError('failing at step 7 as asked')\n"
    )
    res = traceml_run(tmp_path, str(script))
    assert res.returncode == 1
    assert "failing at step 7 as asked" in (tmp_path / "stderr.log").read_text()
    cols = open_recording(tmp_path / "run.tml").read_table("step_time")[0]
    assert cols["step"].tolist() == list(range(8))
    assert np.flatnonzero(cols["failed"]).tolist() == [7]
    rec = open_recording(tmp_path / "run.tml")
    assert rec.attachments["exit"]["status"] == "failed" and rec.attachments["exit"]["exit_code"] == 1
    assert rec.attachments["ranks"]["ranks"][0]["exit_status"] == "failed"


def test_the_exit_code_is_the_scripts_own(tmp_path: Path) -> None:
    script = tmp_path / "exit3.py"
    script.write_text(
        "import sys, traceml\n"
        "for _ in range(5):\n"
        "    with traceml.trace_step():\n"
        "        pass\n"
        "print('leaving with 3')\n"
        "sys.exit(3)\n"
    )
    res = traceml_run(tmp_path, str(script))
    assert res.returncode == 3, res.stderr
    assert steps_by_rank(tmp_path / "run.tml") == {0: list(range(5))}
    assert open_recording(tmp_path / "run.tml").attachments["exit"]["exit_code"] == 3


#: a torch-free training loop: steps until the file ``stop`` appears, then 20 more, exit 0
UNTIL_STOP = """\
import os, time, traceml
i = 0
left = None
while left != 0:
    with traceml.trace_step():
        time.sleep(0.002)
    i += 1
    if i == 50:
        print("at 50", flush=True)
    if left is None and os.path.exists("stop"):
        left = 20
    elif left:
        left -= 1
print(f"finished after {i} steps", flush=True)
"""


def test_training_survives_the_aggregator_being_killed(tmp_path: Path) -> None:
    (tmp_path / "loop.py").write_text(UNTIL_STOP)
    run = LiveRun(tmp_path, "loop.py")
    try:
        run.wait_for_line("at 50")
        wait_for_rows(tmp_path / "run.tml", 50, run)
        run.aggregator().send_signal(signal.SIGKILL)
        run.wait_for_line("the aggregator exited early", stream="stderr")
        (tmp_path / "stop").touch()
    finally:
        code = run.finish()
    assert code == 0, run.stderr
    assert "finished after" in run.out
    # what the aggregator spooled before it died is still readable
    assert open_recording(tmp_path / "run.tml").integrity["status"] in ("recovered", "complete")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_training_and_closes_the_recording(tmp_path: Path, sig: signal.Signals) -> None:
    (tmp_path / "loop.py").write_text(UNTIL_STOP)
    run = LiveRun(tmp_path, "loop.py")
    try:
        run.wait_for_line("at 50")
        wait_for_rows(tmp_path / "run.tml", 50, run)
        run.proc.send_signal(sig)
    finally:
        code = run.finish()
    assert code == 128 + sig, run.stderr
    rec = open_recording(tmp_path / "run.tml")
    assert rec.integrity["status"] == "complete"
    assert rec.attachments["exit"]["status"] == "interrupted" and rec.attachments["exit"]["signal"] == sig.name
    steps = rec.read_table("step_time")[0]["step"]
    assert len(steps) >= 50 and steps.tolist() == list(range(len(steps)))
    if sig == signal.SIGINT:  # KeyboardInterrupt: the rank shuts down cleanly and says so
        assert "KeyboardInterrupt" in (tmp_path / "stderr.log").read_text()
        assert rec.attachments["ranks"]["ranks"][0]["state"] == "finished"


def test_two_nodes_stream_to_node_0s_aggregator(tmp_path: Path) -> None:
    from traceml.cli.launch_plan import free_port

    script = tmp_path / "steps.py"
    script.write_text(
        "import os, traceml\n"
        "for _ in range(12 + int(os.environ['RANK'])):\n"
        "    with traceml.trace_step():\n"
        "        pass\n"
    )
    agg_port, master_port = free_port(), free_port()
    common = ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(master_port)]
    common += ["--aggregator-port", str(agg_port), "--token", "shared-secret", "--ui", "none"]
    node0 = subprocess.Popen(
        [TRACEML, "run", *common, "--node-rank", "0", "--out", str(tmp_path / "run.tml"), str(script)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    node1_dir = tmp_path / "node1"
    node1_dir.mkdir()
    node1 = subprocess.run(
        [TRACEML, "run", *common, "--node-rank", "1", "--run-name", "n1", str(script)],
        cwd=node1_dir,
        capture_output=True,
        text=True,
        timeout=180,
    )
    out0, err0 = node0.communicate(timeout=180)
    assert node0.returncode == 0 and node1.returncode == 0, err0 + node1.stderr
    assert steps_by_rank(tmp_path / "run.tml") == {0: list(range(12)), 1: list(range(13))}
    ranks = open_recording(tmp_path / "run.tml").attachments["ranks"]["ranks"]
    assert sorted((r["rank"], r["node_rank"], r["state"]) for r in ranks) == [(0, 0, "finished"), (1, 1, "finished")]
    assert not list(node1_dir.rglob("*.tml"))  # node 1 records nothing itself
    assert (node1_dir / "traceml_runs" / "n1" / "stdout.log").exists()


def test_second_ctrl_c_kills_a_training_that_ignores_the_first(tmp_path: Path) -> None:
    script = tmp_path / "stubborn.py"
    script.write_text(
        "import signal, time, traceml\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "i = 0\n"
        "while True:\n"
        "    with traceml.trace_step():\n"
        "        time.sleep(0.002)\n"
        "    i += 1\n"
        "    if i == 50:\n"
        "        print('stubborn at 50', flush=True)\n"
    )
    run = LiveRun(tmp_path, str(script))
    try:
        run.wait_for_line("stubborn at 50")
        wait_for_rows(tmp_path / "run.tml", 50, run)  # the rank is connected and its rows are on disk
        run.proc.send_signal(signal.SIGINT)
        run.wait_for_line("stopping the training", stream="stderr")
        run.proc.send_signal(signal.SIGINT)
    finally:
        code = run.finish()
    assert code == 130
    rec = open_recording(tmp_path / "run.tml")
    assert rec.integrity["status"] == "complete"
    assert rec.attachments["exit"]["signal"] == "SIGINT"
    assert rec.attachments["ranks"]["ranks"][0]["state"] == "died"
    assert len(rec.read_table("step_time")[0]["step"]) >= 50
    assert os.path.getsize(tmp_path / "stdout.log") > 0


def test_terminal_ui_shows_the_dashboard_and_the_training_output(tmp_path: Path) -> None:
    import pty

    script = tmp_path / "chatty.py"
    script.write_text(
        "import sys, time, traceml\n"
        "for i in range(300):\n"
        "    with traceml.trace_step():\n"
        "        time.sleep(0.002)\n"
        "    if i % 100 == 99:\n"
        "        print(f'chatty step {i + 1}', flush=True)\n"
        "print('to stderr', file=sys.stderr, flush=True)\n"
    )
    master, slave = pty.openpty()
    os.set_blocking(master, True)
    cmd = [TRACEML, "run", "--ui", "terminal", "--out", str(tmp_path / "run.tml"), str(script)]
    env = {**os.environ, "COLUMNS": "100", "LINES": "50", "TERM": "xterm"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks: list[bytes] = []
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer of the terminal is gone
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(60)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = ANSI.sub("", b"".join(chunks).decode("utf-8", errors="replace"))
    assert code == 0, text[-3000:]
    assert "╭─ traceml ─" in text  # the live region was drawn
    for line in ("chatty step 100", "chatty step 300", "to stderr"):
        assert line in text
    assert "traceml summary" in text and "ok (exit 0)" in text
    assert "exited early" not in text  # the output went through the aggregator, not around it
    assert steps_by_rank(tmp_path / "run.tml") == {0: list(range(300))}


def test_an_output_path_under_a_file_still_trains(tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    script = tmp_path / "steps.py"
    script.write_text(
        "import traceml\nfor _ in range(5):\n    with traceml.trace_step():\n        pass\nprint('trained')\n"
    )
    res = subprocess.run(
        [TRACEML, "run", "--ui", "none", "--out", str(blocker / "run.tml"), str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 0, res.stderr
    assert "trained" in res.stdout and "Traceback" not in res.stderr
    assert f"cannot create {blocker}" in res.stderr  # no logs
    assert "recording stopped (cannot open" in res.stderr  # and no recording, said once each
