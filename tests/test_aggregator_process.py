"""``python -m traceml.aggregator`` as a real process: token check on a real socket, the
control channel on stdin, SIGTERM, and the recording it leaves."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from traceml.aggregator.control import exit_line, output_line
from traceml.cli.launch_plan import free_port
from traceml.format import open_recording
from traceml.schema import PHASES, STEP_TIME, rows_to_columns
from traceml.transport import RankIdentity, TelemetryClient, batch, encode_columns, encode_frame, hello, rank_finished

pytestmark = pytest.mark.slow
TOKEN = "process-test-token"
RUN_ID = "proc-run"


def start_aggregator(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {**os.environ, "TRACEML_TOKEN": TOKEN}
    cmd = [sys.executable, "-m", "traceml.aggregator", "--port", str(port), "--run-id", RUN_ID]
    cmd += ["--expected-ranks", "1", "--out", str(tmp_path / "run.tml"), *extra]
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                out, err = proc.communicate()
                raise AssertionError(f"aggregator did not listen on {port}: {err.decode()}") from None
            time.sleep(0.02)


def ident() -> RankIdentity:
    return RankIdentity(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0, host="h", pid=os.getpid())


def send_steps(port: int, n: int, finish: bool = True) -> None:
    client = TelemetryClient("127.0.0.1", port, hello(RUN_ID, TOKEN, ident()))
    rows = [(s, 1_000 + s, 0, 500, *([50] * len(PHASES))) for s in range(n)]
    client.send(batch(1, {"step_time": encode_columns(STEP_TIME, rows_to_columns(STEP_TIME, rows))}))
    if finish:
        client.send(rank_finished("ok"))
    client.close(drain_timeout_s=10.0)


def wait_for_rows(path: Path, n: int) -> None:
    """Read the growing recording until rank 0 has ``n`` step rows in it (a segment was written)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            got = len(open_recording(path).read_table("step_time").get(0, {}).get("step", ()))
        except Exception:
            got = 0
        if got >= n:
            return
        assert time.monotonic() < deadline, f"{path} never held {n} step rows"
        time.sleep(0.05)


def refused(port: int, token: str) -> bool:
    """Connect, say hello with ``token``, send a batch: True when the server hangs up."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(encode_frame(hello(RUN_ID, token, ident())))
        s.sendall(encode_frame(batch(1, {})))
        try:
            return s.recv(1) == b""
        except ConnectionResetError:
            return True


def test_process_refuses_bad_tokens_records_and_follows_the_control_channel(tmp_path: Path) -> None:
    proc, port = start_aggregator(tmp_path, "--control-stdin", "--run-name", "proc")
    try:
        assert refused(port, "wrong")
        assert refused(port, "")
        send_steps(port, 40)
        out, err = proc.communicate(output_line("stdout", "training says hi\n") + exit_line(0, "", 3.0), timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert "training says hi" in text
    assert "traceml summary" in text and "ok (exit 0)" in text
    assert err.decode().count("wrong token") == 2
    rec = open_recording(tmp_path / "run.tml")
    assert rec.integrity["status"] == "complete"
    assert rec.read_table("step_time")[0]["step"].tolist() == list(range(40))
    assert rec.attachments["exit"]["status"] == "ok"
    assert [r["rank"] for r in rec.attachments["ranks"]["ranks"]] == [0]


def test_sigterm_closes_the_recording(tmp_path: Path) -> None:
    proc, port = start_aggregator(tmp_path, "--control-stdin")
    try:
        client = TelemetryClient("127.0.0.1", port, hello(RUN_ID, TOKEN, ident()))
        rows = [(s, 1_000 + s, 0, 500, *([50] * len(PHASES))) for s in range(25)]
        client.send(batch(1, {"step_time": encode_columns(STEP_TIME, rows_to_columns(STEP_TIME, rows))}))
        client.flush(timeout_s=10)
        wait_for_rows(tmp_path / "run.tml", 25)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        client.close(drain_timeout_s=0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err.decode()
    rec = open_recording(tmp_path / "run.tml")
    assert rec.integrity["status"] == "complete"
    assert rec.read_table("step_time")[0]["step"].tolist() == list(range(25))
    assert rec.attachments["exit"]["status"] == "unknown"
    assert rec.attachments["ranks"]["ranks"][0]["state"] == "died"


def test_standalone_process_ends_when_its_ranks_are_done(tmp_path: Path) -> None:
    proc, port = start_aggregator(tmp_path)
    try:
        send_steps(port, 5)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    assert f"listening on 127.0.0.1:{port}" in err.decode()
    assert open_recording(tmp_path / "run.tml").read_table("step_time")[0]["step"].tolist() == list(range(5))


def test_listen_fd_that_is_not_a_socket_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from traceml.aggregator.__main__ import main

    monkeypatch.setenv("TRACEML_TOKEN", "t" * 32)
    with open(tmp_path / "not-a-socket", "w") as f:
        fd = f.fileno()
        code = main(["--listen-fd", str(fd), "--out", str(tmp_path / "run.tml")])
    assert code == 2
    assert f"--listen-fd {fd} is not a socket" in capsys.readouterr().err
    assert not (tmp_path / "run.tml").exists()  # nothing started
