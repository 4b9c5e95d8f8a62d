"""Security defaults (docs/security.md): the aggregator and the dashboards listen on 127.0.0.1
unless told otherwise; a rank must present the run's token, a wrong one is refused and logged
(never the token itself); the aggregator does not start without a token; ``traceml run``
makes a random token per run and keeps it off command lines."""

from __future__ import annotations

import inspect
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from replay import cli as replay_cli
from traceml.aggregator.control import exit_line
from traceml.cli.launch_plan import aggregator_command, free_port, plan_run, rank_env
from traceml.format import open_recording
from traceml.schema import PHASES, STEP_TIME, rows_to_columns
from traceml.store import ColumnStore
from traceml.transport import RankIdentity, TelemetryClient, batch, encode_columns, encode_frame, hello, rank_finished

pytestmark = pytest.mark.slow
TOKEN = "s3cret-run-token-0123456789abcdef"
RUN_ID = "sec-run"
SCRIPT = Path(__file__).parent / "scripts" / "fault_steps.py"


def outside_address() -> str | None:
    """A non-loopback IPv4 address of this machine (how a rank on another node reaches us)."""
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return str(a.address)
    return None


def start_aggregator(tmp_path: Path, *extra: str, token: str = TOKEN) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACEML_")}
    if token:
        env["TRACEML_TOKEN"] = token
    log = tmp_path / "aggregator.stderr"
    cmd = [sys.executable, "-m", "traceml.aggregator", "--port", str(port), "--run-id", RUN_ID, "--control-stdin"]
    cmd += ["--out", str(tmp_path / "run.tml"), *extra]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
    return proc, port, log


def wait_listening(proc: subprocess.Popen[bytes], timeout: float = 30) -> list[tuple[str, int]]:
    ps = psutil.Process(proc.pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        listening = [
            (c.laddr.ip, c.laddr.port) for c in ps.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN
        ]
        if listening:
            return listening
        time.sleep(0.05)
    raise AssertionError("the aggregator never listened")


def stop(proc: subprocess.Popen[bytes]) -> int:
    assert proc.stdin is not None
    try:
        proc.stdin.write(exit_line(0, "", 1.0))
        proc.stdin.close()
        return proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def ident(rank: int = 0) -> RankIdentity:
    return RankIdentity(
        rank=rank, local_rank=0, world_size=1, local_world_size=1, node_rank=1, host="node1", pid=os.getpid()
    )


def refused(host: str, port: int, token: str) -> bool:
    """Say hello with ``token`` and send a batch: True when the aggregator hangs up on us."""
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(encode_frame(hello(RUN_ID, token, ident())) + encode_frame(batch(1, {})))
        try:
            return s.recv(1) == b""
        except ConnectionResetError:
            return True


def test_the_aggregator_listens_on_loopback_only_by_default(tmp_path: Path) -> None:
    proc, port, _ = start_aggregator(tmp_path)
    try:
        assert wait_listening(proc) == [("127.0.0.1", port)]
        outside = outside_address()
        if outside is not None:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((outside, port), timeout=5).close()
    finally:
        assert stop(proc) == 0


def test_a_remote_rank_needs_the_token_and_a_wrong_one_is_logged_never_echoed(tmp_path: Path) -> None:
    proc, port, log = start_aggregator(tmp_path, "--host", "0.0.0.0")
    host = outside_address() or "127.0.0.1"
    try:
        assert wait_listening(proc) == [("0.0.0.0", port)]
        wrong = "guessed-token-9876"
        assert refused(host, port, wrong)
        assert refused(host, port, "")
        assert refused(host, port, TOKEN[:-1])
        client = TelemetryClient(host, port, hello(RUN_ID, TOKEN, ident()))
        rows = [(s, 1_000 + s, 0, 500, *([50] * len(PHASES))) for s in range(10)]
        client.send(batch(1, {"step_time": encode_columns(STEP_TIME, rows_to_columns(STEP_TIME, rows))}))
        client.send(rank_finished("ok"))
        client.close(drain_timeout_s=10)
    finally:
        code = stop(proc)
    text = log.read_text()
    assert code == 0, text
    assert text.count("wrong token") == 3, text
    assert f"refused connection from {host}:" in text
    assert TOKEN not in text and wrong not in text and TOKEN[:-1] not in text, "tokens must never be logged"
    rec = open_recording(tmp_path / "run.tml")
    assert rec.read_table("step_time")[0]["step"].tolist() == list(range(10))
    assert [r["host"] for r in rec.attachments["ranks"]["ranks"]] == ["node1"]


def test_the_aggregator_does_not_start_without_a_token(tmp_path: Path) -> None:
    proc, _, log = start_aggregator(tmp_path, token="")
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(60) == 2
    assert "TRACEML_TOKEN" in log.read_text()
    assert not (tmp_path / "run.tml").exists()


def test_traceml_run_makes_a_random_token_per_run_and_keeps_it_off_command_lines(tmp_path: Path) -> None:
    plans = [plan_run(str(SCRIPT), out=str(tmp_path / f"r{i}" / "run.tml")) for i in range(3)]
    tokens = {p.token for p in plans}
    assert len(tokens) == 3 and all(len(t) >= 32 for t in tokens)
    plan = plans[0]
    assert plan.aggregator_host == "127.0.0.1"
    assert plan.token not in " ".join(aggregator_command(plan))
    env = rank_env(plan, {"TRACEML_TOKEN": "stale"})
    assert env["TRACEML_TOKEN"] == plan.token and env["TRACEML_AGGREGATOR_HOST"] == "127.0.0.1"


def test_the_dashboards_bind_loopback_by_default_and_warn_otherwise() -> None:
    from traceml.drivers import web

    assert inspect.signature(web.serve_live).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(web.serve).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(replay_cli.replay).parameters["host"].default.default == "127.0.0.1"
    server = web.serve_live(ColumnStore().snapshot, port=0)
    try:
        listening = {
            (c.laddr.ip, c.laddr.port)
            for c in psutil.Process().net_connections("inet")
            if c.status == psutil.CONN_LISTEN
        }
        assert ("127.0.0.1", server.port) in listening
        assert not any(port == server.port and ip != "127.0.0.1" for ip, port in listening)
    finally:
        server.stop()

    said: list[str] = []
    halt = threading.Event()
    halt.set()  # serve() binds, announces, and returns at once
    web.serve(ColumnStore().snapshot, live=True, host="0.0.0.0", port=0, stop=halt, announce=said.append)
    assert any("no authentication" in line and "0.0.0.0" in line for line in said), said
